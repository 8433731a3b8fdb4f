"""What every llamadist gRPC server shares: channel options and the run-until-signal loop."""

from __future__ import annotations

import signal
import threading

import grpc

MAX_MESSAGE_BYTES = 256 * 2**20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def run_until_signal(server: grpc.Server, banner: str, grace_s: float) -> None:
    """Prints `banner` (launchers read the address from it), then serves until SIGINT/SIGTERM
    and stops with a grace period for calls in flight."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(banner, flush=True)
    stop.wait()
    server.stop(grace_s).wait()
