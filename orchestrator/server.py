"""Builds the orchestrator gRPC server (`build_server`) apart from running it (`serve`)."""

from __future__ import annotations

import logging
import threading

import grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.orchestrator import Orchestrator
from orchestrator.servicer import OrchestratorServicer
from protos.shared import security
from protos.shared.allocator import keep_freed_buffers
from protos.shared.serving import listening_server, run_until_signal
from protos.shared.stage_auth import load_stage_key
from protos.shared.standard_services import ReadinessHealth

log = logging.getLogger(__name__)


def build(config: OrchestratorConfig) -> tuple[grpc.Server, int, Orchestrator, ReadinessHealth]:
    """The server is not started; `Orchestrator.start` (waiting for stages) is the caller's.
    With TLS configured, clients get TLS and the stage links mutual TLS (the orchestrator's
    certificate toward the stages); with an API keys file, calls need a key (protos/security).
    The standard Health service comes back too: `serve` turns it NOT_SERVING on SIGTERM."""
    stage_credentials = security.channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
    keys = security.load_api_keys(config.api_keys_file) if config.api_keys_file else None
    keys_check = security.ApiKeyInterceptor(keys) if keys else None
    orch = Orchestrator(
        config,
        stage_credentials=stage_credentials,
        stage_key=load_stage_key(config.stage_key_file) if config.stage_key_file else None,
    )
    server, port, health = listening_server(
        "Orchestrator",
        OrchestratorServicer(orch, keys_check),
        config.host,
        config.port,
        config.max_workers,
        orch.ready,
        credentials=security.server_credentials(
            config.tls_cert, config.tls_key, config.tls_ca, require_client_cert=False
        ),
        interceptors=[keys_check] if keys_check else [],
        max_request_bytes=config.http_max_body_mb * 2**20,  # one limit for both doors
    )
    if keys and stage_credentials is None:
        log.warning("API keys without TLS: keys cross the network in plaintext")
    return server, port, orch, health


def build_server(config: OrchestratorConfig) -> tuple[grpc.Server, int, Orchestrator]:
    """`build` for callers that stop the server themselves (tests: no SIGTERM drain)."""
    server, port, orch, _ = build(config)
    return server, port, orch


def start_http(config: OrchestratorConfig, orch: Orchestrator, port: int | None = None):
    """The OpenAI-compatible HTTP API on `port` (default --http-port; 0 picks a free one), with
    the gRPC side's API keys and TLS certificate. Returns the running HttpServer."""
    from orchestrator.http_server import HttpServer
    from orchestrator.openai_api import OpenAIApi

    keys = security.load_api_keys(config.api_keys_file) if config.api_keys_file else None
    api = OpenAIApi(
        orch, security.ApiKeyInterceptor(keys) if keys else None, config.http_max_body_mb
    )
    http = HttpServer(
        api.app(), config.host, config.http_port if port is None else port,
        config.tls_cert, config.tls_key,
    )  # fmt: skip
    http.start()
    return http


def serve(config: OrchestratorConfig) -> None:
    keep_freed_buffers()  # a step's buffers reuse freed pages (allocator.py)
    server, port, orch, health = build(config)

    def drain(deadline: float) -> None:
        health.shutdown()  # grpc.health.v1: NOT_SERVING from now on
        orch.shut_down(deadline)

    server.start()
    http = start_http(config, orch) if config.http_port >= 0 else None
    if http is not None:
        scheme = "https" if http.tls else "http"
        print(f"OpenAI-compatible API at {scheme}://{config.host}:{http.port}/v1", flush=True)
    threading.Thread(target=orch.start, name="startup", daemon=True).start()
    try:
        run_until_signal(
            server,
            f"llamadist orchestrator listening on {config.host}:{port}",
            config.grace_s,
            drain=drain,
        )
    finally:
        if http is not None:
            http.stop()
        orch.close()
