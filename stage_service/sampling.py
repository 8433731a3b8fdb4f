"""Next-token choice on the last stage: repetition penalty, then temperature, top-k and top-p,
in the order transformers applies them; temperature 0 is greedy.

A seeded draw is a function of (seed, position) only — a counter-based stream: the generator of
the token at position p is seeded from a mix of the seed and p. So a session replayed onto
another replica, after a plan reload or a resume, samples exactly the tokens an uninterrupted run
would have."""

from __future__ import annotations

import math

import torch

from protos.sampling import Sampling


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """logits: [vocab]. Seen tokens' logits are divided by the penalty when positive, multiplied
    when negative (as transformers' RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf (keeps at least one)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted[-1] = False
        remove = remove_sorted.scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): well-spread 64-bit seeds for neighbouring positions."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def draw_generator(seed: int | None, position: int, device: torch.device) -> torch.Generator | None:
    """The generator for the token at `position` (None: unseeded, torch's global stream)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(position_seed(seed, position))
    return generator


class NonFiniteLogits(ValueError):
    """A logits row holds NaN or Inf: no token can be chosen from it."""


def sample(
    logits: torch.Tensor, params: Sampling, seen: list[int], generator: torch.Generator | None
) -> tuple[int, float]:
    """logits: [vocab] float32. Returns (token id, its log-probability under the model)."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits("the logits row holds NaN or Inf")
    scores = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        token = int(torch.argmax(scores))
    else:
        # Shifted so that the largest score is 0: dividing by a small temperature cannot
        # overflow to inf (the softmax is the same).
        scores = (scores - scores.max()) / params.temperature
        scores = filter_top_k_top_p(scores, params.top_k, params.top_p)
        probs = torch.softmax(scores, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    logprob = float(torch.log_softmax(logits, dim=-1)[token])
    return token, logprob


def logsumexp_rows(rows: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(rows, -1) with each row's sum in an order that depends on that row only
    (torch's reduction over [n, vocab] may split rows differently as n changes): on a GPU one
    Triton program per row (invariant_gpu.py), on a CPU one call per row."""
    if rows.is_cuda:
        from stage_service import invariant_gpu  # Triton: GPU hosts only

        return invariant_gpu.logsumexp_rows(rows)
    return torch.stack([torch.logsumexp(row, dim=-1) for row in rows])


def sample_rows(
    logits: torch.Tensor,
    params: list[Sampling],
    seen: list[list[int]],
    generators: list[torch.Generator | None],
    batch_invariant: bool = False,
) -> list[tuple[int, float] | Exception]:
    """logits: [n, vocab] float32, one row per session. Greedy rows without a repetition penalty
    are decided together (one copy to the host for all of them), the others one by one; a row
    that fails gets its exception, the other rows their (token id, log-probability).
    batch_invariant: the greedy rows' log-sum-exp row by row (`logsumexp_rows`), so that a
    row's log-probability does not depend on the rows beside it (a reduction over [n, vocab]
    may split rows by n); their argmax is exact either way, and the other rows go one by one."""
    results: list[tuple[int, float] | Exception | None] = [None] * len(params)
    fast = [i for i, p in enumerate(params) if p.greedy and p.repetition_penalty == 1.0]
    if fast:
        rows = logits if len(fast) == len(params) else logits[fast]
        tokens = rows.argmax(-1)
        lse = logsumexp_rows(rows) if batch_invariant else torch.logsumexp(rows, dim=-1)
        logprobs = rows.gather(1, tokens[:, None])[:, 0] - lse
        # one copy to the host for both (float64 holds every token id exactly)
        picked = torch.stack([tokens.double(), logprobs.double()]).tolist()
        for i, token, logprob in zip(fast, *picked, strict=True):
            # NaN or Inf anywhere in the row makes its log-sum-exp, hence the logprob, non-finite
            finite = math.isfinite(logprob)
            results[i] = (int(token), logprob) if finite else NonFiniteLogits("NaN or Inf")
    for i, p in enumerate(params):
        if results[i] is None:
            try:
                results[i] = sample(logits[i], p, seen[i], generators[i])
            except Exception as err:  # noqa: BLE001 - that row's caller gets it
                results[i] = err
    return results
