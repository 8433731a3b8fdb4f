"""The partition plan: which stage serves which contiguous layer range, validated so that no
layer is dropped or served twice."""

from __future__ import annotations

from dataclasses import dataclass

from protos.errors import InvalidArgument


@dataclass(frozen=True)
class LayerRange:
    start: int  # inclusive
    end: int  # exclusive

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}-{self.end - 1}"


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
        expected = 0
        for i, r in enumerate(self.ranges):
            if r.start != expected:
                raise InvalidArgument(
                    f"stage {i} starts at layer {r.start}, expected {expected}: layers must be "
                    "contiguous and each served once"
                )
            if len(r) <= 0:
                raise InvalidArgument(f"stage {i} has no layers ({r.start}..{r.end})")
            expected = r.end
        if expected != self.num_layers:
            raise InvalidArgument(
                f"plan covers layers 0..{expected - 1} but the model has {self.num_layers}"
            )

    @property
    def num_stages(self) -> int:
        return len(self.ranges)
