"""What every llamadist gRPC server shares: channel options and the run-until-signal loop."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc

from protos.limits import MAX_MESSAGE_BYTES
from protos.shared.handlers import add_service
from protos.shared.standard_services import ReadinessHealth, add_standard_services

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Keepalive pings while calls are open: a peer that vanishes (a cut link, a powered-off
    # host) fails the call within ~2 s instead of at its deadline.
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    # ...and a frozen one (SIGSTOP, a stalled VM), whose kernel still acks TCP: a ping already
    # out when keepalive fires (gRPC sends its own, for flow control) is waited for this long,
    # 60 s by default, and keepalive sends none while it waits.
    ("grpc.http2.ping_timeout_ms", 1000),
    ("grpc.http2.max_pings_without_data", 0),
    # Servers: accept those pings (the default would answer them with GOAWAY "too_many_pings").
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
]


def run_until_signal(
    server: grpc.Server,
    banner: str,
    grace_s: float,
    drain: Callable[[float], None] | None = None,
) -> None:
    """Prints `banner` (launchers read the address from it), then serves until SIGINT/SIGTERM
    and stops within `grace_s`: `drain(deadline)` (a time.monotonic() deadline) winds the work
    in flight down first, then calls still open are cancelled."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(banner, flush=True)
    stop.wait()
    deadline = time.monotonic() + grace_s
    if drain is not None:
        drain(deadline)
    server.stop(max(0.0, deadline - time.monotonic())).wait()


def listening_server(
    service_name: str,
    servicer: object,
    host: str,
    port: int,
    max_workers: int,
    ready: Callable[[], tuple[bool, str]],
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_request_bytes: int = MAX_MESSAGE_BYTES,
    stopped: Callable[[], None] = lambda: None,
) -> tuple[ServerWithHealth, int, ReadinessHealth]:
    """A server (not started) with `servicer` serving `llamadist.<service_name>` on host:port,
    and the standard Health (following `ready()`) and reflection services; port 0 picks a free
    one. With `credentials` the port speaks TLS only (protos/shared/security.py), else plaintext.
    A request message over `max_request_bytes` is refused RESOURCE_EXHAUSTED by gRPC itself,
    before it is decoded. `stopped()` runs once the server has stopped (ServerWithHealth)."""
    options = [o for o in GRPC_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    workers = futures.ThreadPoolExecutor(max_workers=max_workers)
    server = grpc.server(
        workers,
        options=[*options, ("grpc.max_receive_message_length", max_request_bytes)],
        interceptors=list(interceptors),
    )
    add_service(server, service_name, servicer)
    health = add_standard_services(server, service_name, ready)
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return ServerWithHealth(server, health, workers, stopped), bound, health


class ServerWithHealth:
    """A grpc.Server that leaves nothing running once stopped, for a process that goes on
    (tests, reloads): stop() ends its Health's watcher (NOT_SERVING from then on) and, once the
    calls have ended, its worker threads and `stopped()` (a stage's compute thread). Anything
    else is the server's."""

    def __init__(
        self,
        server: grpc.Server,
        health: ReadinessHealth,
        workers: futures.ThreadPoolExecutor,
        stopped: Callable[[], None],
    ):
        self._server = server
        self._health = health
        self._workers = workers
        self._stopped = stopped

    def stop(self, grace):
        self._health.shutdown()
        done = self._server.stop(grace)
        threading.Thread(target=self._after, args=(done,), name="stopping", daemon=True).start()
        return done

    def _after(self, done: threading.Event) -> None:
        done.wait()
        self._workers.shutdown(wait=False)
        self._stopped()

    def __getattr__(self, name: str):
        return getattr(self._server, name)
