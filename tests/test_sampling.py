"""Sampling against transformers' own logits processors on the same scores."""

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from protos.errors import InvalidArgument
from protos.sampling import Sampling
from stage_service.sampling import (
    apply_repetition_penalty,
    draw_generator,
    filter_top_k_top_p,
    sample,
    sample_rows,
)

CPU = torch.device("cpu")


def scores(seed=0, n=50):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_its_logprob():
    logits = scores()
    token, logprob = sample(logits, Sampling(), [], None)
    assert token == int(logits.argmax())
    assert math.isfinite(logprob)
    assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    logits, seen = scores(1), [3, 7, 7, 12, 40]
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), logits[None].clone())[0]
    assert torch.equal(apply_repetition_penalty(logits, seen, penalty), ref)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.01)])
def test_top_k_top_p_match_transformers(top_k, top_p):
    logits = scores(2)[None]
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = filter_top_k_top_p(logits[0], top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref[0]))
    assert torch.equal(got[~torch.isinf(got)], ref[0][~torch.isinf(ref[0])])


def test_sampling_stays_inside_top_k_and_follows_the_seed():
    logits = scores(3)
    allowed = set(torch.topk(logits, 3).indices.tolist())
    params = Sampling(temperature=1.5, top_k=3, seed=7)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, params, [], g)[0] for _ in range(40)]

    a, b = draw(7), draw(7)
    assert a == b and set(a) <= allowed and len(set(a)) > 1
    assert draw(8) != a


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(top_k=-2),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(repetition_penalty=0.0),
        dict(temperature=float("nan")),
    ],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(InvalidArgument):
        Sampling(**kwargs)


def test_the_smallest_allowed_temperature_is_near_greedy_and_finite():
    logits = scores(4)
    token, logprob = sample(logits, Sampling(temperature=1e-3, seed=1), [], torch.Generator())
    assert token == int(logits.argmax()) and math.isfinite(logprob)


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-39), dict(repetition_penalty=1e-39)])
def test_parameters_that_would_overflow_are_refused(kwargs):
    with pytest.raises(InvalidArgument):
        Sampling(**kwargs)


def test_sample_rows_equals_sampling_each_row():
    """Every row of a batch, greedy or sampled, gets what `sample` gives that row alone with the
    same generator (the stage seeds it from (seed, position): stage_service/stage.py)."""
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(2)) * 3
    params = [
        Sampling(),
        Sampling(repetition_penalty=1.3),
        Sampling(),
        Sampling(temperature=0.8, top_k=5, seed=3),
        Sampling(),
        Sampling(temperature=1.5, top_p=0.9, seed=4),
        Sampling(temperature=2.0, repetition_penalty=1.2, seed=5),
    ]
    seen = [[1, 2], [int(logits[1].argmax()), 4], [], [7], [9], [], [int(logits[6].argmax())]]
    positions = [12, 13, 14, 15, 16, 17, 18]

    def generators():
        return [draw_generator(p.seed, pos, CPU) for p, pos in zip(params, positions, strict=True)]

    rows = sample_rows(logits, params, seen, generators())
    # fresh generators for the rows alone: the same streams the batch drew from
    alone = [sample(logits[i], params[i], seen[i], g) for i, g in enumerate(generators())]
    for i, (row, want) in enumerate(zip(rows, alone, strict=True)):
        assert row[0] == want[0], f"row {i}"
        assert math.isfinite(row[1]) and row[1] == pytest.approx(want[1], abs=1e-5), f"row {i}"
    assert rows[1][0] != int(logits[1].argmax())  # the penalty applied to that row only
    assert rows[0][0] == int(logits[0].argmax()) and rows[2][0] == int(logits[2].argmax())
    # the sampled rows are draws, not argmaxes: over positions they vary within their filters
    draws = [
        sample_rows(logits, params, seen, [draw_generator(p.seed, pos, CPU) for p in params])
        for pos in range(20)
    ]
    top5 = set(torch.topk(logits[3], 5).indices.tolist())
    assert {d[3][0] for d in draws} <= top5 and len({d[3][0] for d in draws}) > 1


@pytest.mark.parametrize("vocab", [50, 49152])
def test_batch_invariant_rows_equal_each_row_alone_bit_for_bit(vocab):
    """With batch_invariant, a row's token and log-probability are the same bits whatever rows
    share its step (greedy rows are decided together, their log-sum-exp row by row)."""
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(5)) * 4
    params = [Sampling(), Sampling(temperature=0.7, seed=1), *[Sampling()] * 6, Sampling()]
    seen = [[3]] * len(params)

    def gens(idx):
        return [draw_generator(params[i].seed, 20 + i, CPU) for i in idx]

    crowded = sample_rows(logits, params, seen, gens(range(9)), batch_invariant=True)
    for i in range(9):
        alone = sample_rows(logits[i : i + 1], params[i : i + 1], seen[:1], gens([i]), True)
        assert crowded[i] == alone[0], f"row {i}"
    # and a subset, in another order, gives each row the same bits again
    order = [8, 2, 1, 5]
    picked = sample_rows(logits[order], [params[i] for i in order], seen[:4], gens(order), True)
    assert picked == [crowded[i] for i in order]
