"""The OpenAI API's field checks: each names its field and what it takes; a value JSON allows but
the wire cannot carry (an integer past 64 bits, a float past float32) is refused here, with a 400,
not met as an error later (orchestrator/openai_api.py reads requests through these)."""

from __future__ import annotations

from protos import errors

INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise errors.InvalidArgument(f"{name} must be a number, got {shown(value)}")
    if not abs(value) <= FLOAT32_MAX:  # also NaN
        raise errors.InvalidArgument(f"{name} must be a finite number, got {shown(value)}")
    return float(value)


def integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)  # 4.0 is 4
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise errors.InvalidArgument(
            f"{name} must be an integer in [{low}, {high}], got {shown(value)}"
        )
    return value


def boolean(body: dict, name: str, prefix: str = "") -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise errors.InvalidArgument(f"{prefix}{name} must be true or false, got {shown(value)}")
    return value
