"""The partition plan: which stage serves which contiguous layer range, validated so that no
layer is dropped or served twice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protos.errors import InvalidArgument
from protos.shared.layer_range import LayerRange


def check_contiguous(ranges: Sequence[LayerRange], num_layers: int, name: str) -> None:
    """The one contiguity check: the ranges, in order, serve layers 0..num_layers-1 each exactly
    once. `name` says what the ranges are in the message ("stage", "custom range")."""
    expected = 0
    for i, r in enumerate(ranges):
        if len(r) <= 0:
            raise InvalidArgument(f"{name} {i} ({r.start}..{r.end - 1}) has no layers")
        if r.start != expected:
            if r.start > expected:
                gap = f"layer(s) {LayerRange(expected, r.start)} are served by no stage"
            else:
                gap = f"layer(s) {LayerRange(r.start, min(expected, r.end))} would be served twice"
            before = (
                "the first range must start at layer 0"
                if i == 0
                else f"the layers before it end at {expected - 1}"
            )
            raise InvalidArgument(
                f"{name} {i} ({r}) starts at layer {r.start} but {before}: {gap} "
                f"(starts at layer {r.start}, expected {expected})"
            )
        expected = r.end
    if expected != num_layers:
        if expected < num_layers:
            gap = f"layer(s) {LayerRange(expected, num_layers)} are served by no stage"
        else:
            gap = f"layer(s) {LayerRange(num_layers, expected)} do not exist"
        raise InvalidArgument(
            f"the {name}s end at layer {expected - 1} but the model has {num_layers} layers "
            f"(0-{num_layers - 1}): {gap}"
        )


@dataclass(frozen=True)
class PartitionPlan:
    num_layers: int
    addresses: tuple[str, ...]  # one per stage, in pipeline order
    ranges: tuple[LayerRange, ...]
    strategy: str
    epoch: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if len(self.addresses) != len(self.ranges):
            raise InvalidArgument(
                f"plan has {len(self.addresses)} stages but {len(self.ranges)} layer ranges"
            )
        if not self.ranges:
            raise InvalidArgument("a plan needs at least one stage")
        check_contiguous(self.ranges, self.num_layers, "stage")

    @property
    def num_stages(self) -> int:
        return len(self.ranges)
