"""The image's HEALTHCHECK: find the llamadist service this container runs and call its Health.

The role is the container's command (`llamadist stage ...` or `llamadist orchestrator ...`), read
from /proc, with its --host and --port. A stage is healthy when it answers at all (it gets its
layers from the orchestrator later); the orchestrator when it serves. Other commands (generate,
plan, ...) are one-shot clients and count as healthy."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SERVICES = ("stage", "orchestrator")
DEFAULT_PORT = {"stage": "0", "orchestrator": "50051"}
ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")


def service_argv() -> list[str] | None:
    """The arguments after `llamadist` of the service process, lowest pid first."""
    pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        for i, arg in enumerate(argv[:-1]):
            if os.path.basename(arg) == "llamadist" and argv[i + 1] in SERVICES:
                return argv[i + 1 :]
    return None


def option(argv: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def main() -> int:
    argv = service_argv()
    if argv is None:
        print("no llamadist service in this container: nothing to check")
        return 0
    role = argv[0]
    host = option(argv, "--host", "127.0.0.1")
    host = "127.0.0.1" if host in ANY_ADDRESS else host
    port = option(argv, "--port", DEFAULT_PORT[role])
    if port == "0":
        print(f"the {role} listens on a random port (--port 0): give it a fixed --port")
        return 1
    check = ["llamadist", "health", "--server", f"{host}:{port}"]
    if role == "stage":
        check.insert(2, "--stage")
    os.execvp(check[0], check)


if __name__ == "__main__":
    sys.exit(main())
