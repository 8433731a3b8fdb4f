"""Next-token choice on the last stage: repetition penalty, then temperature, top-k and top-p,
in the order transformers applies them; temperature 0 is greedy."""

from __future__ import annotations

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


def sample(
    logits: torch.Tensor, params: Sampling, seen: list[int], generator: torch.Generator | None
) -> tuple[int, float]:
    """logits: [vocab] float32. Returns (token id, its log-probability under the model)."""
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
