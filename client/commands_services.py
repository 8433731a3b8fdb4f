"""`llamadist stage`, `llamadist orchestrator` and `llamadist up`. The flags of the first two are
derived from their config dataclasses (stage_service/config.py, orchestrator/config.py), where
each knob's default, help and check are declared once."""

from __future__ import annotations

import argparse
import signal
import threading

from orchestrator.config import ENV_PREFIX as ORCHESTRATOR_ENV
from orchestrator.config import OrchestratorConfig
from protos.sampling import SPECULATE_MODES
from protos.shared import logs
from protos.shared.knob_checks import positive
from protos.shared.knobs import add_flags, check_value, checked, default, from_args
from stage_service.config import ENV_PREFIX as STAGE_ENV
from stage_service.config import QUANTIZE, StageConfig


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, StageConfig, STAGE_ENV)


def run_stage(a: argparse.Namespace) -> int:
    config = from_args(StageConfig, a, STAGE_ENV)  # checked before torch is imported
    logs.configure(config.log_format, "stage")
    from stage_service.server import serve

    serve(config)
    return 0


def add_orchestrator_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, OrchestratorConfig, ORCHESTRATOR_ENV)


def run_orchestrator(a: argparse.Namespace) -> int:
    config = from_args(OrchestratorConfig, a, ORCHESTRATOR_ENV)
    logs.configure(config.log_format, "orchestrator")
    from orchestrator.server import serve

    serve(config)
    return 0


SPECULATION_FLAGS = ("speculate", "speculate_k", "draft_model")  # `up` passes them on


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR", help="as for stage and orchestrator")
    p.add_argument(
        "--stages", type=checked(int, positive), default=2, help="number of stage processes"
    )
    p.add_argument("--port", type=int, default=50051, help="orchestrator port (0 = any free one)")
    p.add_argument(
        "--threads",
        type=checked(int, positive),
        default=None,
        help="torch threads per stage (default: the cores shared out)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=8080,
        help="the orchestrator's OpenAI-compatible HTTP API and /metrics (0 = any free port, "
        "-1 = off)",
    )
    p.add_argument(
        "--quantize", choices=QUANTIZE, default="none", help="as for stage: every stage's weights"
    )
    p.add_argument("--quant-group", type=int, default=0, help="as for stage")
    p.add_argument(
        "--batch-invariant", choices=("auto", "on", "off"), default="auto", help="as for stage"
    )
    for name in ("tls_cert", "tls_key", "tls_ca"):
        p.add_argument(
            f"--{name.replace('_', '-')}", default="", metavar="PEM", help="as for stage"
        )
    p.add_argument("--api-keys-file", default="", help="as for orchestrator")
    p.add_argument("--speculate", choices=SPECULATE_MODES, default=None, help="as for orchestrator")
    p.add_argument("--speculate-k", type=int, default=None, help="as for orchestrator")
    p.add_argument("--draft-model", default=None, metavar="DIR", help="as for orchestrator")
    p.add_argument(
        "--secure",
        action="store_true",
        help="TLS everywhere and API keys: makes a development CA, certificates and an API "
        "keys file in the log directory (unless given with the flags above)",
    )


def run_up(a: argparse.Namespace) -> int:
    from client.launcher import LocalMesh

    model = a.model or default(StageConfig, "model")
    # The values `up` passes on, checked by their declarations before any process starts.
    check_value(StageConfig, "model", model)
    check_value(OrchestratorConfig, "port", a.port)
    check_value(StageConfig, "quant_group", a.quant_group)
    check_value(OrchestratorConfig, "http_port", a.http_port)
    for name in ("tls_cert", "tls_key", "tls_ca", "api_keys_file"):
        check_value(OrchestratorConfig, name, getattr(a, name))
    speculation = []  # passed on as given; the orchestrator's defaults otherwise
    for name in SPECULATION_FLAGS:
        value = getattr(a, name)
        if value is not None:
            check_value(OrchestratorConfig, name, value)
            speculation += [f"--{name.replace('_', '-')}", str(value)]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh = LocalMesh(
        model,
        num_stages=a.stages,
        port=a.port,
        threads=a.threads,
        extra_stage_args=[
            "--quantize",
            a.quantize,
            "--quant-group",
            str(a.quant_group),
            "--batch-invariant",
            a.batch_invariant,
        ],  # fmt: skip
        extra_orchestrator_args=["--http-port", str(a.http_port), *speculation],
        secure=a.secure,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_ca=a.tls_ca,
        api_keys_file=a.api_keys_file,
    )
    print(f"starting {a.stages} stages and an orchestrator (logs in {mesh.log_dir})", flush=True)
    with mesh:
        if mesh.tls_ca:
            print(f"TLS: clients give --tls-ca {mesh.tls_ca}", flush=True)
        if mesh.stage_key_file:  # a stage started by hand joins this mesh with it
            print(f"stage key: {mesh.stage_key_file} (--stage-key-file)", flush=True)
        if mesh.api_keys_file:
            made = " (one key alone in .client, .admin)" if mesh.api_keys else ""
            print(f"API keys file: {mesh.api_keys_file}{made}; clients give --api-key", flush=True)
        if mesh.http_url:
            print(f"OpenAI-compatible API: {mesh.http_url} (metrics: /metrics)", flush=True)
        print(f"llamadist mesh ready: orchestrator listening on {mesh.address}", flush=True)
        stop.wait()
        print("stopping", flush=True)
    return 0
