"""Builds the orchestrator gRPC server (`build_server`) apart from running it (`serve`)."""

from __future__ import annotations

import threading

import grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.orchestrator import Orchestrator
from orchestrator.servicer import OrchestratorServicer
from protos import llamadist_pb2_grpc as pb_grpc
from protos.serving import listening_server, run_until_signal


def build_server(config: OrchestratorConfig) -> tuple[grpc.Server, int, Orchestrator]:
    """The server is not started; `Orchestrator.start` (waiting for stages) is the caller's."""
    orch = Orchestrator(config)
    server, port = listening_server(
        pb_grpc.add_OrchestratorServicer_to_server,
        OrchestratorServicer(orch),
        config.host,
        config.port,
        config.max_workers,
    )
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
