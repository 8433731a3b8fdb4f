"""Sampling parameters as a checked value, shared by the orchestrator (which refuses bad ones
before any stage works) and the last stage (which samples with them); and the speculative
decoding modes a request may name (GenerateRequest.speculate)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum

from protos import llamadist_pb2 as pb
from protos.errors import InvalidArgument

FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")  # besides the seed


class Speculate(str, Enum):
    """GenerateRequest.speculate ('' = the orchestrator's --speculate)."""

    OFF = "off"
    LOOKUP = "lookup"  # prompt lookup: no model
    DRAFT = "draft"  # the orchestrator's --draft-model


SPECULATE_MODES = tuple(m.value for m in Speculate)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (
                self.temperature == 0 or 1e-3 <= self.temperature <= 100,
                "temperature must be 0 (greedy) or in [0.001, 100]",
            ),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (
                0 < self.top_p <= 1,
                "top_p must be in (0, 1] (1 = off; for greedy decoding send temperature 0)",
            ),
            (
                0.01 <= self.repetition_penalty <= 100,
                "repetition_penalty must be in [0.01, 100] (1 = off)",
            ),
        ]
        for ok, message in checks:
            if not ok or any(math.isnan(v) for v in self._floats()):
                raise InvalidArgument(f"{message}; got {self}")

    def _floats(self) -> tuple[float, ...]:
        return (self.temperature, self.top_p, self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_pb(cls, msg: pb.SamplingParams) -> Sampling:
        """An unset field is off (the dataclass default); a field set to a value outside its
        range is refused, 0 included: top_p 0 or repetition_penalty 0 is not read as "off"
        (for greedy decoding send temperature 0). The sessions of a batch mostly share their
        parameters: each distinct message is checked once (~20 us a step otherwise)."""
        return _from_wire(msg.SerializeToString(deterministic=True))


@functools.lru_cache(maxsize=4096)
def _from_wire(data: bytes) -> Sampling:
    msg = pb.SamplingParams.FromString(data)
    given = {f: getattr(msg, f) for f in FIELDS if msg.HasField(f)}
    return Sampling(**given, seed=msg.seed if msg.HasField("seed") else None)
