"""How many tokens a session drafts per step (adaptive k), and its drafting counts.

A step of 1 + k rows costs more than a one-token step (on a CPU much more: a few rows of
matmuls are compute-bound there), and it pays only when enough drafts are kept. So k is chosen
per step to maximize expected tokens per unit of time:

    E(k) / cost(1 + k),   E(k) = 1 + a + a^2 + .. + a^k

where a is the session's estimated chance that a draft is kept given the one before it was
(kept drafts over kept drafts + rejections, both decaying so the estimate follows the text), and
cost(rows) is the measured wall time of decode steps of that many rows on this mesh (StepCosts,
shared by the sessions; a row count not yet measured is assumed as cheap as one row, so it gets
tried once). When k = 0 wins, the session drafts nothing but probes with one draft every
PROBE_EVERY steps, so that a text that turns repetitive is noticed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from orchestrator.drafting import Drafter, DraftSession
from protos.errors import FailedPrecondition, InvalidArgument
from protos.sampling import SPECULATE_MODES, Speculate

PROBE_EVERY = 8  # steps without drafts between probes when drafting does not pay
DECAY = 0.9  # per verify step, for the acceptance counts
COST_WEIGHT = 0.1  # of a new measurement in the step cost average


class StepCosts:
    """Mean wall time of decode steps by their rows (1 + drafts), an exponential average per
    row count, shared by a generator's sessions."""

    def __init__(self) -> None:
        self._ms: dict[int, float] = {}
        self._lock = threading.Lock()

    def observe(self, rows: int, ms: float) -> None:
        with self._lock:
            old = self._ms.get(rows)
            self._ms[rows] = ms if old is None else old + COST_WEIGHT * (ms - old)

    def known(self, rows: int) -> bool:
        return rows in self._ms

    def of(self, rows: int) -> float:
        """The measured cost, else one row's (optimistic: it gets measured)."""
        ms = self._ms.get(rows)
        return ms if ms is not None else self._ms[1]


@dataclass
class AdaptiveK:
    k_max: int
    costs: StepCosts = field(default_factory=StepCosts)
    kept: float = 1.0  # decaying count of drafts kept (prior: a = 1/2)
    missed: float = 1.0  # decaying count of steps that rejected a draft
    idle: int = 0  # steps without drafts since drafting last paid or was probed
    drafted: int = 0  # tokens drafted and sent for verification
    accepted: int = 0  # of those, kept

    @property
    def acceptance(self) -> float:
        return self.kept / (self.kept + self.missed)

    def best_k(self, limit: int) -> int:
        """The k in 0..limit with the most expected tokens per unit of time (0 until a
        one-token step was measured: the baseline comes first)."""
        if not self.costs.known(1):
            return 0
        a, best, best_rate, expected = self.acceptance, 0, 1.0 / self.costs.of(1), 1.0
        for k in range(1, limit + 1):
            expected += a**k
            rate = expected / self.costs.of(1 + k)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def next_k(self, remaining: int) -> int:
        """Drafts for the next step, `remaining` tokens before max_new_tokens (the step's own
        token among them)."""
        limit = max(0, min(self.k_max, remaining - 1))
        k = self.best_k(limit)
        if k == 0 and limit > 0:
            self.idle += 1
            if self.idle >= PROBE_EVERY:
                self.idle = 0
                return 1
        return k

    def record(self, drafted: int, accepted: int, wall_ms: float | None = None) -> None:
        """A decode step's outcome: drafts sent and kept, and its wall time (None: not a plain
        decode step, e.g. a replay)."""
        if wall_ms is not None:
            self.costs.observe(1 + drafted, wall_ms)
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.kept = self.kept * DECAY + accepted
        self.missed = self.missed * DECAY + (accepted < drafted)


@dataclass(frozen=True)
class SpeculationPolicy:
    """The orchestrator's speculation settings (--speculate, --speculate-k,
    --speculate-max-sessions) and its drafters, by mode."""

    default: Speculate = Speculate.OFF
    k: int = 4
    max_sessions: int = 4  # more decoding sessions than this: no drafts (batching pays more)
    drafters: dict[Speculate, Drafter] = field(default_factory=dict)

    def mode(self, requested: str) -> Speculate:
        """The mode a request runs with ('' = the default); refuses unknown or unavailable ones."""
        if not requested:
            return self.default
        try:
            mode = Speculate(requested)
        except ValueError:
            raise InvalidArgument(
                f"speculate must be one of {', '.join(SPECULATE_MODES)} (or empty for the "
                f"orchestrator's default), got {requested!r}"
            ) from None
        if mode is not Speculate.OFF and mode not in self.drafters:
            raise FailedPrecondition(
                f"speculate={mode.value} needs a draft model: start the orchestrator with "
                "--draft-model DIR (a small model with the same tokenizer)"
            )
        return mode

    def close(self) -> None:
        for drafter in self.drafters.values():
            drafter.close()

    def session(self, mode: Speculate, prompt_ids: list[int]) -> DraftSession | None:
        drafter = self.drafters.get(mode)
        return drafter.start(prompt_ids) if drafter is not None else None
