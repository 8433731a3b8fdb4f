"""Builds the stage gRPC server (`build_server`) apart from running it (`serve`).

Its credential: mutual TLS (callers need a certificate of --tls-ca) and/or the mesh's stage key
(protos/shared/stage_auth.py), which the stage also sends on its links to next stages. Without
either it refuses to start, unless --insecure-open-stage; then it warns at every start."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from protos.shared.allocator import keep_freed_buffers
from protos.shared.hop import HopDialer, tls_server_context
from protos.shared.security import channel_credentials, server_credentials
from protos.shared.serving import listening_server, run_until_signal
from protos.shared.stage_auth import StageKeyInterceptor, load_stage_key
from protos.shared.standard_services import ReadinessHealth
from stage_service.config import StageConfig
from stage_service.forwarding import Forwarder
from stage_service.hop_server import HopServer, ServerWithHop
from stage_service.servicer import StageServicer
from stage_service.stage import Stage
from stage_service.step_streams import StepStreams

log = logging.getLogger(__name__)


OPEN_WARNING = (
    "WARNING: this stage runs with --insecure-open-stage: anyone who can reach %s:%d can read "
    "its state and change it (drop or load layers, take weights, run or end any session's "
    "steps). Give it --stage-key-file or mutual TLS (--tls-*) outside a sealed test network"
)


@dataclass(frozen=True)
class BuiltStage:
    """A stage's server, built and not started, with what serving and stopping it need."""

    server: ServerWithHop  # the gRPC server and the hop socket's
    port: int
    servicer: StageServicer
    health: ReadinessHealth  # the standard grpc.health.v1 service

    @property
    def stage(self) -> Stage:
        return self.servicer.stage

    def drain(self, deadline: float) -> None:
        """Shutting down: Health says NOT_SERVING from now on, then the open streams end once
        what they took is settled (StepStreams.drain)."""
        self.health.shutdown()
        self.servicer.streams.drain(deadline)


def build(config: StageConfig) -> BuiltStage:
    config.check_credential()  # before anything is loaded
    credentials = server_credentials(  # mutual TLS: callers need a certificate of tls_ca
        config.tls_cert, config.tls_key, config.tls_ca, require_client_cert=True
    )
    key = load_stage_key(config.key_file) if config.key_file else None
    torch.set_num_threads(config.threads)
    # toward the next stage of a route: the stage's own certificate, trusting the same CA, and
    # the mesh's stage key
    forwarder = Forwarder(
        channel_credentials(config.tls_ca, config.tls_cert, config.tls_key),
        key,
        HopDialer.from_flags(config.hop, config.tls_ca, config.tls_cert, config.tls_key, key),
    )
    stage = Stage(config, around_batch=forwarder.holding)
    streams = StepStreams(stage, forwarder)
    hop = None
    if config.hop == "socket":
        tls = None  # the gRPC service's mutual TLS, on the socket too
        if credentials is not None:
            tls = tls_server_context(config.tls_ca, config.tls_cert, config.tls_key)
        hop = HopServer(streams, config.host, config.hop_port, key, tls)
    servicer = StageServicer(stage, streams, hop.info() if hop else {})
    grpc_server, port, health = listening_server(
        "Stage",
        servicer,
        config.host,
        config.port,
        config.max_workers,
        stage.ready,
        credentials=credentials,
        interceptors=[StageKeyInterceptor(key)] if key else [],
        stopped=stage.close,
    )
    server = ServerWithHop(grpc_server, hop)
    if config.insecure_open_stage:
        log.warning(OPEN_WARNING, config.host, port)
    return BuiltStage(server, port, servicer, health)


def build_server(config: StageConfig) -> tuple[ServerWithHop, int, Stage]:
    built = build(config)
    return built.server, built.port, built.stage


def serve(config: StageConfig) -> None:
    keep_freed_buffers()  # a step's buffers reuse freed pages (allocator.py)
    built = build(config)
    stage = built.stage
    built.server.start()
    log.info("stage on %s, model %s (%s)", stage.holder.device, config.model, stage.fingerprint)
    if config.metrics_port:
        stage.metrics.serve(config.host, config.metrics_port)
        log.info("metrics at http://%s:%d/metrics", config.host, config.metrics_port)
    run_until_signal(
        built.server,
        f"llamadist stage listening on {config.host}:{built.port}",
        config.grace_s,
        drain=built.drain,
    )
