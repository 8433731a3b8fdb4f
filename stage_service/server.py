"""Builds the stage gRPC server (`build_server`) apart from running it (`serve`)."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import torch

from protos import llamadist_pb2_grpc as pb_grpc
from protos.serving import GRPC_OPTIONS, run_until_signal
from stage_service.config import StageConfig
from stage_service.servicer import StageServicer
from stage_service.stage import Stage

log = logging.getLogger(__name__)


def build_server(config: StageConfig) -> tuple[grpc.Server, int, Stage]:
    torch.set_num_threads(config.threads)
    stage = Stage(config)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers), options=GRPC_OPTIONS
    )
    pb_grpc.add_StageServicer_to_server(StageServicer(stage), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    return server, port, stage


def serve(config: StageConfig) -> None:
    server, port, stage = build_server(config)
    server.start()
    log.info("stage on %s, model %s (%s)", stage.device, config.model, stage.fingerprint)
    run_until_signal(server, f"llamadist stage listening on {config.host}:{port}", config.grace_s)
