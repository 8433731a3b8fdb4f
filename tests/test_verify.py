"""Verify steps on a stage (speculative decoding): a step carrying drafted tokens answers how
many the model keeps and its pick after them, exactly as ordinary one-token steps would pick,
and the next step cuts the rejected positions out of the cache."""

from __future__ import annotations

import pytest
import torch

from protos.errors import InvalidArgument
from protos.sampling import Sampling
from stage_service.config import StageConfig
from stage_service.stage import Stage, StepInput
from stage_service.verify import Verdict, accept
from tests.conftest import make_tiny_model, reference_greedy

PROMPT = [5, 17, 3, 99, 42, 8, 8, 61]
NEW = 14


def plain_run(stage: Stage, session: str, sampling: Sampling) -> list[int]:
    """Non-speculative: prefill, then one token per step."""
    out, pos, step_input = [], 0, list(PROMPT)
    while len(out) < NEW:
        reply = stage.run_step(StepInput(session, 1, pos, step_input, None, sampling))
        pos += len(step_input)
        out.append(reply.token_id)
        step_input = [reply.token_id]
    return out


def speculative_run(
    stage: Stage, session: str, sampling: Sampling, guess, k: int = 4
) -> tuple[list[int], int, int]:
    """Drafts k tokens per step with guess(position in the output, generated so far): returns
    the output, how many tokens were drafted and how many of them kept."""
    first = stage.run_step(StepInput(session, 1, 0, PROMPT, None, sampling))
    out, drafted, kept = [first.token_id], 0, 0
    pos = len(PROMPT)  # the position of out[-1], not cached yet
    while len(out) < NEW:
        drafts = [guess(len(out) + i, out) for i in range(min(k, NEW - len(out) - 1))]
        step = StepInput(session, 1, pos, [out[-1], *drafts], None, sampling, False, len(drafts))
        reply = stage.run_step(step)
        assert 0 <= reply.accepted_drafts <= len(drafts)
        assert len(reply.draft_logprobs) == reply.accepted_drafts
        new = drafts[: reply.accepted_drafts] + [reply.token_id]
        kept += reply.accepted_drafts
        drafted += len(drafts)
        pos += len(new)
        out += new
    return out[:NEW], drafted, kept


def guesses(truth: list[int], wrong_every: int):
    """A drafter that knows the answer but is wrong at every `wrong_every`-th position."""

    def guess(i: int, _out: list[int]) -> int:
        t = truth[i] if i < len(truth) else 0
        return (t + 1) % 101 if wrong_every and i % wrong_every == 0 else t

    return guess


@pytest.mark.parametrize("static_kv", ["off", "on"])
@pytest.mark.parametrize("wrong_every", [0, 3, 1])
def test_greedy_verify_equals_transformers(tiny_root, static_kv, wrong_every):
    model_dir = make_tiny_model(tiny_root, "gqa")
    truth = reference_greedy(model_dir, PROMPT, NEW)
    stage = Stage(
        StageConfig(
            model=str(model_dir), static_kv=static_kv, max_context=128, batch_invariant="off"
        )
    )
    stage.load_layers(0, 4, epoch=1)
    got, drafted, kept = speculative_run(stage, "s", Sampling(), guesses(truth, wrong_every))
    assert got == truth
    assert kept == {0: drafted, 1: 0}.get(wrong_every, kept)
    assert 0 < kept < drafted or wrong_every != 3


@pytest.mark.parametrize("seed", [1, 7, 123])
def test_seeded_sampling_with_penalty_equals_plain_steps(tiny_root, seed):
    """The picks after drafted positions use the penalty over every token before them and the
    position's seeded draw: the same tokens as one-token steps, whatever the drafts."""
    model_dir = make_tiny_model(tiny_root, "odd_layers_tied")
    stage = Stage(StageConfig(model=str(model_dir), max_context=128))
    stage.load_layers(0, 5, epoch=1)
    sampling = Sampling(temperature=0.8, top_k=40, repetition_penalty=1.3, seed=seed)
    truth = plain_run(stage, "plain", sampling)
    for wrong_every in (0, 2):
        got, _, _ = speculative_run(
            stage, f"spec{wrong_every}", sampling, guesses(truth, wrong_every)
        )
        assert got == truth


def test_quantized_stage_verifies_like_its_plain_steps(tiny_root):
    """int8 on CPU: one-token steps take the fused C path, verify steps the general one."""
    model_dir = make_tiny_model(tiny_root, "gqa")
    stage = Stage(StageConfig(model=str(model_dir), quantize="int8", max_context=128))
    stage.load_layers(0, 4, epoch=1)
    truth = plain_run(stage, "plain", Sampling())
    got, _, _ = speculative_run(stage, "spec", Sampling(), guesses(truth, 3))
    assert got == truth


def test_two_stages_pass_drafts_to_the_last(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    truth = reference_greedy(model_dir, PROMPT, 3)
    first = Stage(StageConfig(model=str(model_dir), max_context=128))
    last = Stage(StageConfig(model=str(model_dir), max_context=128))
    first.load_layers(0, 2, epoch=1)
    last.load_layers(2, 4, epoch=1)
    ids = [*PROMPT, truth[0], truth[1], (truth[2] + 1) % 101]  # two right, one wrong
    hidden = first.run_step(StepInput("s", 1, 0, ids, None, Sampling(), False, 3)).hidden
    assert hidden.shape == (len(ids), 64)
    reply = last.run_step(StepInput("s", 1, 0, ids, hidden, Sampling(), False, 3))
    assert (reply.accepted_drafts, reply.token_id) == (2, truth[2])


def test_full_logits_with_drafts(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    truth = reference_greedy(model_dir, PROMPT, 2)
    stage = Stage(StageConfig(model=str(model_dir), max_context=128))
    stage.load_layers(0, 4, epoch=1)
    ids = [*PROMPT, truth[0]]
    reply = stage.run_step(StepInput("s", 1, 0, ids, None, Sampling(), True, 1))
    assert reply.logits.shape == (len(ids), 101)
    assert (reply.accepted_drafts, reply.token_id) == (1, truth[1])
    assert int(torch.argmax(reply.logits[-1])) == truth[1]


@pytest.mark.parametrize("drafts", [-1, 8, 17])
def test_bad_draft_counts_are_refused(tiny_root, drafts):
    model_dir = make_tiny_model(tiny_root, "gqa")
    stage = Stage(StageConfig(model=str(model_dir), max_context=128))
    stage.load_layers(0, 4, epoch=1)
    tokens = PROMPT if drafts != 17 else PROMPT * 3
    with pytest.raises(InvalidArgument, match="draft_tokens must be in"):
        stage.run_step(StepInput("s", 1, 0, tokens, None, Sampling(), False, drafts))


def test_accept_keeps_the_agreeing_prefix():
    picks = [(4, -0.1), (5, -0.2), (9, -0.3), (1, -0.4)]
    assert accept([4, 5, 6], picks) == Verdict(2, 9, -0.3, [-0.1, -0.2])
    assert accept([4, 5, 9], picks) == Verdict(3, 1, -0.4, [-0.1, -0.2, -0.3])
    assert accept([0, 5, 9], picks) == Verdict(0, 4, -0.1, [])
    failed = ValueError("row")
    assert accept([4], [(4, 0.0), failed]) is failed


def test_point_mass_acceptance_is_the_standard_rule():
    """Over many seeds, the first token after a verify step is distributed as the model's p
    (what speculative sampling promises), the draft is kept with probability p(d) and a
    rejection draws from p without d, renormalized (the standard rule for a point-mass draft).
    Chi-square bounds are loose (p-value ~1e-6): the seeds are fixed, so this is deterministic."""
    from stage_service.sampling import sample_rows
    from stage_service.verify import RowInputs, add_rows

    logits = torch.tensor([[2.0, 1.5, 0.3, -0.5, 1.0, 0.0], [0.0] * 6])  # row 0 decides d
    p = torch.softmax(logits[0], -1)
    draft = 1
    sampling_runs = 6000
    first = torch.zeros(6)
    kept = 0
    rejected = torch.zeros(6)
    for seed in range(sampling_runs):
        rows = RowInputs()
        sampling = Sampling(temperature=1.0, seed=seed)
        add_rows(rows, [3, draft], 5, 2, 1, sampling, torch.device("cpu"))
        verdict = accept([draft], sample_rows(logits, rows.params, rows.seen, rows.generators))
        token = draft if verdict.accepted else verdict.token_id
        first[token] += 1
        kept += verdict.accepted
        if not verdict.accepted:
            rejected[verdict.token_id] += 1

    def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
        expected = probs * counts.sum()
        nonzero = expected > 0
        return float(((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum())

    assert chi_square(first, p) < 35.9  # df 5
    q = p.clone()
    q[draft] = 0
    assert rejected[draft] == 0
    assert chi_square(rejected, q / q.sum()) < 33.4  # df 4
    sd = (p[draft] * (1 - p[draft]) / sampling_runs) ** 0.5
    assert abs(kept / sampling_runs - p[draft]) < 5 * sd


def test_static_slots_run_verify_steps_in_the_decoder(tiny_root, monkeypatch):
    """With static KV (CUDA graphs on a GPU), a token and its drafts are rows of the fixed-shape
    decode step, all on the session's slot, each attending up to its own position."""
    model_dir = make_tiny_model(tiny_root, "gqa")
    truth = reference_greedy(model_dir, PROMPT, NEW)
    stage = Stage(
        StageConfig(model=str(model_dir), static_kv="on", max_context=128, batch_invariant="off")
    )
    stage.load_layers(0, 4, epoch=1)
    decoder = stage.loaded.decoder
    calls = []
    real_run = decoder.run

    def run(slots, positions, token_ids, hidden):
        calls.append((list(slots), list(positions)))
        return real_run(slots, positions, token_ids, hidden)

    monkeypatch.setattr(decoder, "run", run)
    got, drafted, _ = speculative_run(stage, "s", Sampling(), guesses(truth, 3), k=4)
    assert got == truth
    assert drafted > 0 and calls
    slots, positions = calls[0]
    assert len(slots) == 5 and len(set(slots)) == 1  # the first step: a token and 4 drafts
    assert positions == list(range(positions[0], positions[0] + 5))
