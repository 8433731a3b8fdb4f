"""The flags that name the server for every client command (which orchestrator, TLS, API key)
and the connection they make. Environment fallbacks: LLAMADIST_API_KEY, LLAMADIST_TLS_CA,
LLAMADIST_TLS_CERT, LLAMADIST_TLS_KEY."""

from __future__ import annotations

import argparse
import os

from client.client import Client
from protos.shared.knob_checks import host_port, readable_file
from protos.shared.knobs import checked

DEFAULT_SERVER = "127.0.0.1:50051"


def _pem(text: str) -> str:
    """A PEM file flag: empty (not given) or a readable file."""
    if problem := readable_file(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        type=checked(str, host_port),
        help=f"orchestrator host:port (default {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLAMADIST_API_KEY", ""),
        help="API key sent as 'authorization: Bearer <key>' (default: $LLAMADIST_API_KEY)",
    )
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("LLAMADIST_TLS_CA", ""),
        type=_pem,
        help="CA certificate (PEM) that signed the server's: use TLS (default: "
        "$LLAMADIST_TLS_CA; empty = plaintext)",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get("LLAMADIST_TLS_CERT", ""),
        type=_pem,
        help="client certificate (PEM), e.g. for health --stage against a TLS stage "
        "(default: $LLAMADIST_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        default=os.environ.get("LLAMADIST_TLS_KEY", ""),
        type=_pem,
        help="its private key (default: $LLAMADIST_TLS_KEY)",
    )


def tls(a: argparse.Namespace) -> dict[str, str | None]:
    return dict(tls_ca=a.tls_ca or None, tls_cert=a.tls_cert or None, tls_key=a.tls_key or None)


def client(a: argparse.Namespace) -> Client:
    return Client(a.server, api_key=a.api_key or None, **tls(a))


def connect(a: argparse.Namespace) -> Client:
    """A client of `--server` that answered Health (serving or not): a server that is not
    there fails here within Health's 5 s deadline, not after a generation's."""
    connected = client(a)
    try:
        connected.health()
    except BaseException:
        connected.close()
        raise
    return connected
