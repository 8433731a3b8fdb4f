"""The one layer-range type: a contiguous run of decoder layers [start, end), what a plan gives
a stage, what a submodel holds, what a stage loads. Frozen, torch-free, importable by every
service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerRange:
    start: int  # inclusive
    end: int  # exclusive

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}-{self.end - 1}"

    def __contains__(self, layer: int) -> bool:
        return self.start <= layer < self.end

    def missing(self, wanted: LayerRange) -> list[int]:
        """The layers of `wanted` outside this range."""
        return [i for i in range(wanted.start, wanted.end) if i not in self]
