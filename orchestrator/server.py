"""Builds the orchestrator gRPC server (`build_server`) apart from running it (`serve`)."""

from __future__ import annotations

import logging
import threading

import grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.orchestrator import Orchestrator
from orchestrator.servicer import OrchestratorServicer
from protos import security
from protos.serving import listening_server, run_until_signal

log = logging.getLogger(__name__)


def build_server(config: OrchestratorConfig) -> tuple[grpc.Server, int, Orchestrator]:
    """The server is not started; `Orchestrator.start` (waiting for stages) is the caller's.
    With TLS configured, clients get TLS and the stage links mutual TLS (the orchestrator's
    certificate toward the stages); with an API keys file, calls need a key (protos/security)."""
    stage_credentials = security.channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
    keys = security.load_api_keys(config.api_keys_file) if config.api_keys_file else None
    keys_check = security.ApiKeyInterceptor(keys) if keys else None
    orch = Orchestrator(config)
    orch.router.channel_credentials = stage_credentials  # read by Router.client for StageClient
    server, port = listening_server(
        "Orchestrator",
        OrchestratorServicer(orch, keys_check),
        config.host,
        config.port,
        config.max_workers,
        credentials=security.server_credentials(
            config.tls_cert, config.tls_key, config.tls_ca, require_client_cert=False
        ),
        interceptors=[keys_check] if keys_check else [],
    )
    if keys and stage_credentials is None:
        log.warning("API keys without TLS: keys cross the network in plaintext")
    return server, port, orch


def serve(config: OrchestratorConfig) -> None:
    server, port, orch = build_server(config)
    server.start()
    threading.Thread(target=orch.start, name="startup", daemon=True).start()
    try:
        run_until_signal(
            server,
            f"llamadist orchestrator listening on {config.host}:{port}",
            config.grace_s,
            drain=orch.shut_down,
        )
    finally:
        orch.close()
