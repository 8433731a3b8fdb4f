"""Verification of drafted tokens on the last stage (speculative decoding).

A step with drafts carries [t, d1 .. dk] at positions [p, p+k]; its last k+1 logits rows say
what the model picks at positions p+1 .. p+k+1. Each row is decided exactly as an ordinary step
at that position decides it: the repetition penalty over every token before it (the drafted
ones included) and the seeded draw of that position (stage_service/sampling.py). The drafts are
kept while they equal those picks; the first pick that differs (or the pick after the last
draft) is the step's token.

Why this is the standard speculative-sampling rule: a drafter here proposes one token per
position, a point mass q = 1[d]. The rule "accept d with probability min(1, p(d)/q(d)), else draw
from max(0, p - q) renormalized" then reads "accept d with probability p(d), else draw from p
without d", and "draw t ~ p, accept iff t == d, else answer t" is exactly that: P(accept) = p(d),
and a rejection's token is p conditioned on t != d. Using the position's own seeded draw also
makes a seeded speculative run choose the very tokens a non-speculative run chooses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protos.sampling import Sampling
from stage_service.sampling import draw_generator


@dataclass
class RowInputs:
    """What sample_rows needs for the rows a step decides: one entry per row."""

    params: list[Sampling] = field(default_factory=list)
    seen: list[list[int]] = field(default_factory=list)
    generators: list[torch.Generator | None] = field(default_factory=list)


@dataclass
class Verdict:
    accepted: int  # leading drafted tokens kept
    token_id: int  # the pick after them
    logprob: float
    draft_logprobs: list[float]


def add_rows(
    rows: RowInputs,
    seen: list[int],
    start_pos: int,
    num_tokens: int,
    draft_tokens: int,
    sampling: Sampling,
    device: torch.device,
) -> None:
    """Appends the inputs of a step's decided rows: its last draft_tokens + 1 input positions.
    seen: the session's tokens through the step's last input. The row of input i (of
    num_tokens) picks the token at start_pos + i + 1 after the tokens through input i."""
    for i in range(num_tokens - draft_tokens - 1, num_tokens):
        later = num_tokens - 1 - i  # inputs after this row's
        rows.params.append(sampling)
        rows.seen.append(seen[: len(seen) - later] if later else seen)
        rows.generators.append(draw_generator(sampling.seed, start_pos + i + 1, device))


def accept(drafts: list[int], picks: list[tuple[int, float] | Exception]) -> Verdict | Exception:
    """picks: the model's (token, logprob) after each of len(drafts) + 1 positions. Keeps the
    drafts up to the first that differs from the pick at its position."""
    assert len(picks) == len(drafts) + 1
    logprobs: list[float] = []
    for i, pick in enumerate(picks):
        if isinstance(pick, Exception):
            return pick
        token, logprob = pick
        if i == len(drafts) or token != drafts[i]:
            return Verdict(i, token, logprob, logprobs)
        logprobs.append(logprob)
    raise AssertionError("unreachable: the last pick always answers")
