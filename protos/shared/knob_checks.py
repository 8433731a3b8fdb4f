"""The checks a knob (protos/shared/knobs.py) may declare: each takes the value and answers None
when it is fine, else what is wrong with it, which the knob's refusal names with its flag."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Check = Callable[[Any], "str | None"]


def in_range(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be {low}..{high}, got {v!r}"


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be positive, got {v!r}"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v!r}"


def non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def host_port(address: str) -> str | None:
    """HOST:PORT, port 1..65535 (IPv6 hosts in brackets: [::1]:7001)."""
    host, _, port = address.rpartition(":")
    if host.strip() and port.isdigit() and 0 < int(port) < 65536:
        return None
    return f"{address!r} is not host:port (port 1..65535)"


def readable_file(path: str) -> str | None:
    """Empty = not given; else a file this process can read."""
    if not path:
        return None
    p = Path(path)
    if not p.exists():
        return f"{path}: no such file"
    if not p.is_file():
        return f"{path}: not a file"
    try:
        with p.open("rb"):
            pass
    except OSError as err:
        return f"{path}: cannot read it ({err.strerror or err})"
    return None


def model_dir(path: str) -> str | None:
    """An HF-layout model directory: it must at least hold config.json."""
    p = Path(path)
    if not p.is_dir():
        problem = "does not exist" if not p.exists() else "is not a directory"
    elif not (p / "config.json").is_file():
        problem = "has no config.json"
    else:
        return None
    return (
        f"{path} {problem}: give an HF-layout model directory (config.json, *.safetensors, "
        "tokenizer files); `llamadist model fetch-default` makes the default one"
    )


def model_dir_or_none(path: str) -> str | None:
    """'' (no model directory: a stage with --fetch-weights; see ServiceConfig) or model_dir."""
    return None if path == "" else model_dir(path)
