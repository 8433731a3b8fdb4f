"""A plan request: the strategy (one of five), how many stages, memory limits, custom ranges,
and its parsing from text (the orchestrator's flags, a PlanRequest message). Checked here once;
orchestrator/strategies.py turns a spec into a plan. No torch and no gRPC here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import Enum

from protos.errors import InvalidArgument
from protos.shared.layer_range import LayerRange


class Strategy(str, Enum):
    UNIFORM = "uniform"
    MEMORY = "memory"
    COMPUTE = "compute"
    MIXED = "mixed"
    CUSTOM = "custom"

    @classmethod
    def parse(cls, name: str) -> Strategy:
        """The one check of a strategy name (command line, config, PlanRequest)."""
        try:
            return cls(name)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise InvalidArgument(f"unknown strategy {name!r}; choose one of {names}") from None


STRATEGIES = tuple(s.value for s in Strategy)


@dataclass(frozen=True)
class PlanSpec:
    strategy: Strategy = Strategy.UNIFORM
    num_partitions: int | None = None  # None = one per given stage; N < stages: the first N
    # () = each stage's own memory_bytes; one value = the limit of every stage; else one per
    # used stage
    max_memory_bytes: tuple[int, ...] = ()
    custom_boundaries: tuple[LayerRange, ...] = ()  # CUSTOM only

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, Strategy):
            object.__setattr__(self, "strategy", Strategy.parse(self.strategy))
        object.__setattr__(self, "max_memory_bytes", tuple(self.max_memory_bytes))
        object.__setattr__(self, "custom_boundaries", tuple(self.custom_boundaries))


# ---------------------------------------------------------------- parsing


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_MEMORY_FORMS = (
    "plain bytes (1073741824) or a number with a unit: KB, MB, GB, TB (powers of 1000) or "
    "KiB, MiB, GiB, TiB (powers of 1024), e.g. 4GB or 512MiB; one value for every stage or "
    "one per stage, comma-separated (4GB,8GB)"
)


def parse_memory(text: str) -> tuple[int, ...]:
    """'4GB' / '512MiB' / '4GB,8GB' / '1073741824' -> bytes per stage."""
    if not text or not text.strip():
        raise InvalidArgument(f"empty memory limit; use {_MEMORY_FORMS}")
    values = []
    for part in text.split(","):
        m = _MEMORY.match(part)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise InvalidArgument(
                f"memory limit {part.strip()!r} is not understood; use {_MEMORY_FORMS}"
            )
        try:
            amount = Decimal(m.group(1)) * _UNITS[unit]
        except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
            raise InvalidArgument(f"memory limit {part.strip()!r} is not a number") from None
        if amount != amount.to_integral_value():
            raise InvalidArgument(
                f"memory limit {part.strip()!r} is not a whole number of bytes; use {_MEMORY_FORMS}"
            )
        if amount <= 0:
            raise InvalidArgument(f"memory limit {part.strip()!r} must be more than 0 bytes")
        values.append(int(amount))
    return tuple(values)


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_boundaries(text: str) -> tuple[LayerRange, ...]:
    """'0-9,10-29' (inclusive, one range per stage; '7' is the one layer 7) -> LayerRanges.
    Only the syntax is checked here; coverage of the model is checked by make_plan."""
    if not text or not text.strip():
        raise InvalidArgument(
            "empty layer ranges; give one inclusive range per stage, e.g. 0-9,10-29"
        )
    ranges = []
    for part in text.split(","):
        m = _RANGE.match(part)
        if m is None:
            raise InvalidArgument(
                f"layer range {part.strip()!r} is not understood; give one inclusive range per "
                "stage as FIRST-LAST layer numbers, comma-separated, e.g. 0-9,10-29"
            )
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise InvalidArgument(
                f"layer range {part.strip()!r} ends before it starts; write FIRST-LAST with "
                "FIRST <= LAST"
            )
        ranges.append(LayerRange(first, last + 1))
    return tuple(ranges)


def spec_from_text(
    strategy: str = "", num_partitions: int = 0, max_memory: str = "", boundaries: str = ""
) -> PlanSpec:
    """An operator's plan request as text (the orchestrator's flags, a PlanRequest message;
    "" and 0 = the defaults) -> a checked PlanSpec."""
    chosen = Strategy.parse(strategy or Strategy.UNIFORM.value)
    if boundaries and chosen is not Strategy.CUSTOM:
        raise InvalidArgument("boundaries are for the custom strategy only")
    if chosen is Strategy.CUSTOM and not boundaries:
        raise InvalidArgument("the custom strategy needs boundaries such as 0-9,10-29")
    return PlanSpec(
        strategy=chosen,
        num_partitions=num_partitions or None,
        max_memory_bytes=parse_memory(max_memory) if max_memory else (),
        custom_boundaries=parse_boundaries(boundaries) if boundaries else (),
    )
