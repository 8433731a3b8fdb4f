"""How many tokens a session drafts per step (adaptive k), and its drafting counts.

k grows by one after a step whose drafts were all kept and halves after one that kept none, so
a drafter that keeps failing costs little: at k = 0 the session drafts nothing for a pause
(doubling after each failed probe, up to MAX_PAUSE_STEPS), then probes again with k = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.drafting import SPECULATE_MODES, Drafter, DraftSession, Speculate
from protos.errors import FailedPrecondition, InvalidArgument

MAX_PAUSE_STEPS = 64
FIRST_PAUSE_STEPS = 4


@dataclass
class AdaptiveK:
    k_max: int
    k: int = 0
    pause: int = 0  # steps left without drafting
    pause_len: int = FIRST_PAUSE_STEPS
    drafted: int = 0  # tokens drafted and sent for verification
    accepted: int = 0  # of those, kept
    trips: int = 0  # verify steps

    def __post_init__(self) -> None:
        self.k = self.k or self.k_max

    def next_k(self, remaining: int) -> int:
        """Drafts for the next step, `remaining` tokens before max_new_tokens (the step's own
        token among them)."""
        if self.pause > 0:
            self.pause -= 1
            if self.pause == 0:
                self.k = 1  # probe
            return 0
        return max(0, min(self.k, remaining - 1))

    def record(self, drafted: int, accepted: int) -> None:
        """A verify step's outcome (drafted 0: nothing to learn from it)."""
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.trips += 1
        if accepted == drafted:
            self.k = min(self.k + 1, self.k_max)
            self.pause_len = FIRST_PAUSE_STEPS
        elif accepted == 0:
            self.k //= 2
            if self.k == 0:
                self.pause = self.pause_len
                self.pause_len = min(2 * self.pause_len, MAX_PAUSE_STEPS)


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
