"""Partition strategies: pure functions (num_layers, stage addresses) -> PartitionPlan."""

from __future__ import annotations

from orchestrator.plan import LayerRange, PartitionPlan
from protos.errors import InvalidArgument


def uniform(num_layers: int, addresses: list[str], epoch: int = 1) -> PartitionPlan:
    """Equal layer counts; the remainder goes to the first stages, one each."""
    n = len(addresses)
    if not 0 < n <= num_layers:
        raise InvalidArgument(f"cannot split {num_layers} layers over {n} stages")
    base, extra = divmod(num_layers, n)
    ranges, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        ranges.append(LayerRange(start, start + size))
        start += size
    return PartitionPlan(num_layers, tuple(addresses), tuple(ranges), "uniform", epoch)


STRATEGIES = {"uniform": uniform}
