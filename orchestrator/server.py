"""Builds the orchestrator gRPC server (`build_server`) apart from running it (`serve`)."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.orchestrator import Orchestrator
from orchestrator.servicer import OrchestratorServicer
from protos import llamadist_pb2_grpc as pb_grpc
from protos.serving import GRPC_OPTIONS, run_until_signal


def build_server(config: OrchestratorConfig) -> tuple[grpc.Server, int, Orchestrator]:
    """The server is not started; `Orchestrator.start` (waiting for stages) is the caller's."""
    orch = Orchestrator(config)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers), options=GRPC_OPTIONS
    )
    pb_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(orch), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    return server, port, orch


def serve(config: OrchestratorConfig) -> None:
    server, port, orch = build_server(config)
    server.start()
    threading.Thread(target=orch.start, name="startup", daemon=True).start()
    try:
        run_until_signal(
            server, f"llamadist orchestrator listening on {config.host}:{port}", config.grace_s
        )
    finally:
        orch.close()
