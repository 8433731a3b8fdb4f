"""The standard gRPC services every llamadist server also speaks, so that common tools work on
it unchanged: `grpc.health.v1.Health` (grpc_health_probe, Kubernetes gRPC probes, compose
health checks) and server reflection (`grpcurl -plaintext host:port list`).

Health answers what the service's own Health RPC answers (its real readiness: layers loaded,
compute thread alive; stages planned and reachable), for the overall server ("") and for
`llamadist.<Service>`: a Check asks the service afresh, and a watcher thread pushes changes to
Watch streams once a second.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import llamadist_pb2 as pb

WATCH_S = 1.0
HEALTH_METHODS = frozenset(f"/{health.SERVICE_NAME}/{m}" for m in ("Check", "Watch"))
REFLECTION_METHOD = f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"


class ReadinessHealth(health.HealthServicer):
    """grpc.health.v1.Health whose statuses follow `ready()` (-> (ok, detail))."""

    def __init__(self, ready: Callable[[], tuple[bool, str]], services: list[str]):
        super().__init__(experimental_non_blocking=True)
        self._ready = ready
        self._services = services
        self._stop = threading.Event()
        self.refresh()
        threading.Thread(target=self._watch, name="health-watch", daemon=True).start()

    def refresh(self) -> None:
        ok = self._ready()[0]
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for name in self._services:
            self.set(name, status)

    def Check(self, request, context):  # noqa: N802 - the gRPC method's name
        if not self._stop.is_set():
            self.refresh()
        return super().Check(request, context)

    def shutdown(self) -> None:
        """NOT_SERVING from now on (the server is stopping)."""
        self._stop.set()
        self.enter_graceful_shutdown()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            self.refresh()


def add_standard_services(
    server: grpc.Server, service_name: str, ready: Callable[[], tuple[bool, str]]
) -> ReadinessHealth:
    """Adds Health and reflection to `server`, which serves `llamadist.<service_name>`."""
    full_name = pb.DESCRIPTOR.services_by_name[service_name].full_name
    servicer = ReadinessHealth(ready, ["", full_name])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return servicer
