"""Speculative decoding through a real gRPC mesh: greedy output with prompt lookup equals
transformers' generate and our own non-speculative path, across 1-3 stages, a reload mid-stream
and bad input; seeded sampling is the same with and without speculation."""

from __future__ import annotations

import pytest
import torch

from client.client import ClientError
from tests.conftest import TINY_CONFIGS, in_process_mesh, make_tiny_model, reference_greedy

NEW_TOKENS = 40
# Repeats, so that prompt lookup finds n-grams to draft from at once.
PROMPT = [7, 3, 99, 12, 45, 7, 3, 99, 12, 45, 7, 3, 99]


def tokens(pieces) -> list[int]:
    return [t for p in pieces for t in p.token_ids]


@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_lookup_greedy_equals_transformers_and_plain(tiny_root, name, num_stages):
    model_dir = make_tiny_model(tiny_root, name)
    expected = reference_greedy(model_dir, PROMPT, NEW_TOKENS)
    with in_process_mesh(model_dir, num_stages, speculate="lookup") as mesh:
        spec = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
        plain = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS, speculate="off")
    assert spec.token_ids == expected
    assert plain.token_ids == expected
    assert spec.finish_reason == "length"
    t = spec.timings
    assert int(t["drafted_tokens"]) > 0  # the verify path ran
    assert 0 <= int(t["accepted_tokens"]) <= int(t["drafted_tokens"])
    # every trip gives one token plus the drafts it kept
    assert int(t["trips"]) + int(t["accepted_tokens"]) == NEW_TOKENS
    assert int(plain.timings["trips"]) == NEW_TOKENS and int(plain.timings["drafted_tokens"]) == 0


def test_streamed_pieces_and_logprobs_match_the_plain_path(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    with in_process_mesh(model_dir, 2, speculate="lookup", speculate_k=6) as mesh:
        plain = mesh.client.generate(token_ids=PROMPT, max_new_tokens=30, speculate="off")
        pieces = list(mesh.client.stream(token_ids=PROMPT, max_new_tokens=30))
    assert tokens(pieces) == plain.token_ids
    logprobs = [lp for p in pieces for lp in p.logprobs]
    torch.testing.assert_close(logprobs, plain.logprobs, rtol=1e-4, atol=1e-4)
    assert int(pieces[-1].timings["accepted_tokens"]) > 0  # some piece carried several tokens
    assert len(pieces) < 30


def test_max_new_tokens_is_never_exceeded(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    expected = reference_greedy(model_dir, PROMPT, 9)
    with in_process_mesh(model_dir, 1, speculate="lookup", speculate_k=8) as mesh:
        for n in (1, 2, 5, 9):
            result = mesh.client.generate(token_ids=PROMPT, max_new_tokens=n)
            assert result.token_ids == expected[:n] and result.finish_reason == "length"


def test_seeded_sampling_is_the_same_with_and_without_speculation(tiny_root):
    """The last stage draws each position's token from (seed, position), drafts or not."""
    model_dir = make_tiny_model(tiny_root, "odd_layers_tied")
    with in_process_mesh(model_dir, 2, speculate="lookup") as mesh:
        for seed in (1, 2, 3):
            sampling = dict(temperature=0.7, top_k=20, seed=seed, repetition_penalty=1.1)
            args = dict(token_ids=PROMPT, max_new_tokens=40, **sampling)
            plain = mesh.client.generate(speculate="off", **args)
            spec = mesh.client.generate(**args)
            again = mesh.client.generate(**args)
            assert spec.token_ids == plain.token_ids == again.token_ids


def test_reload_mid_stream_keeps_speculative_greedy_output(tmp_path):
    model_dir = make_tiny_model(tmp_path, "untied_mha")  # 6 layers
    expected = reference_greedy(model_dir, PROMPT, 120)
    with in_process_mesh(model_dir, 3, plan_stages=2, speculate="lookup") as mesh:
        stream = mesh.client.stream(token_ids=PROMPT, max_new_tokens=120)
        pieces = [next(stream), next(stream)]
        mesh.client.reload_plan(strategy="custom", boundaries="0-1,2-3,4-5", stages=mesh.addresses)
        pieces += list(stream)
    assert tokens(pieces) == expected
    assert pieces[-1].timings["replays"] >= 1
    assert int(pieces[-1].timings["drafted_tokens"]) > 0


def test_bad_speculation_requests_are_refused(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    with in_process_mesh(model_dir, 1) as mesh:
        with pytest.raises(ClientError) as err:
            mesh.client.generate(token_ids=PROMPT, max_new_tokens=4, speculate="magic")
        assert err.value.code == "INVALID_ARGUMENT" and "off, lookup, draft" in str(err.value)
        with pytest.raises(ClientError) as err:
            mesh.client.generate(token_ids=PROMPT, max_new_tokens=4, speculate="draft")
        assert err.value.code == "FAILED_PRECONDITION" and "--draft-model" in str(err.value)
        # the service goes on serving
        assert len(mesh.client.generate(token_ids=PROMPT, max_new_tokens=4).token_ids) == 4


@pytest.mark.slow
def test_killing_a_replica_mid_stream_keeps_speculative_greedy_output(tmp_path):
    from tests.test_failover import Mesh, kill, the_one_serving

    model_dir = make_tiny_model(tmp_path, "untied_mha")
    expected = reference_greedy(model_dir, PROMPT, 150)
    mesh = Mesh(model_dir, tmp_path)
    try:
        a, b, c = mesh.stage("a"), mesh.stage("b"), mesh.stage("c")
        client = mesh.orchestrator(f"{a.address}+{b.address},{c.address}", "--speculate", "lookup")
        stream = client.stream(token_ids=PROMPT, max_new_tokens=150)
        pieces = [next(stream) for _ in range(3)]
        victim, _ = the_one_serving(client, a, b)
        kill(victim)
        pieces += list(stream)
    finally:
        mesh.stop()
    assert tokens(pieces) == expected
    assert pieces[-1].timings["replays"] >= 1
    assert int(pieces[-1].timings["drafted_tokens"]) > 0


def test_metrics_export_drafted_kept_and_their_ratio(tiny_root):
    from prometheus_client.parser import text_string_to_metric_families

    model_dir = make_tiny_model(tiny_root, "gqa")
    with in_process_mesh(model_dir, 2, speculate="lookup") as mesh:
        timings = [
            mesh.client.generate(token_ids=PROMPT, max_new_tokens=30).timings for _ in range(2)
        ]
        text = mesh.orchestrator.metrics.exposition().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    drafted = sum(int(t["drafted_tokens"]) for t in timings)
    accepted = sum(int(t["accepted_tokens"]) for t in timings)
    assert drafted > 0
    assert samples["llamadist_draft_tokens_total"] == drafted
    assert samples["llamadist_accepted_draft_tokens_total"] == accepted
    assert samples["llamadist_draft_acceptance_ratio"] == pytest.approx(accepted / drafted)


@pytest.mark.slow
def test_a_session_resumed_after_its_stage_died_stays_exact(tmp_path):
    """No replica: the request fails, the stage comes back, the resume replays the kept tokens
    only and goes on drafting."""
    import time

    from tests.test_failover import Mesh, kill

    model_dir = make_tiny_model(tmp_path, "untied_mha")
    expected = reference_greedy(model_dir, PROMPT, 150)
    mesh = Mesh(model_dir, tmp_path)
    try:
        a, b = mesh.stage("a"), mesh.stage("b")
        port_b = b.address.rsplit(":", 1)[1]
        client = mesh.orchestrator(f"{a.address},{b.address}", "--speculate", "lookup")
        stream = client.stream(token_ids=PROMPT, max_new_tokens=150, session_id="spec-resume")
        pieces = [next(stream) for _ in range(3)]
        kill(b)
        with pytest.raises(ClientError) as err:
            pieces += list(stream)
        assert err.value.code == "UNAVAILABLE" and "spec-resume" in err.value.message
        mesh.stage("b-again", int(port_b))  # the prober reloads its layers
        deadline = time.monotonic() + 30
        while True:
            try:
                resumed = client.generate(
                    token_ids=[1], max_new_tokens=150, session_id="spec-resume"
                )
                break
            except ClientError as e:
                assert e.code == "UNAVAILABLE" and time.monotonic() < deadline, e
                time.sleep(0.2)
    finally:
        mesh.stop()
    assert resumed.token_ids[: len(tokens(pieces))] == tokens(pieces)
    assert resumed.token_ids == expected
    assert int(resumed.timings["replays"]) >= 1
    assert int(resumed.timings["drafted_tokens"]) > 0


@pytest.mark.parametrize(
    "options",
    [
        dict(quantize="int8"),
        dict(quantize="int4", quant_group=32),
        dict(static_kv="on", batch_invariant="off"),
    ],
    ids=["int8", "int4", "static-kv"],
)
def test_quantized_and_static_stages_verify_exactly(tiny_root, tmp_path, options):
    """int8/int4 stages (verify steps in the fused C path) equal transformers on the
    dequantized weights; static KV slots (one-token steps in the fixed-shape decoder, verify
    steps in the general path) equal transformers on the model."""
    from stage_service.weights import Quantization
    from tests.dequantize import write_dequantized

    model_dir = make_tiny_model(tiny_root, "gqa")
    reference = model_dir
    if "quantize" in options:
        reference = tmp_path / "dequantized"
        group = options.get("quant_group", 64)
        write_dequantized(model_dir, reference, Quantization(options["quantize"], group))
    expected = reference_greedy(reference, PROMPT, NEW_TOKENS)
    stage_options = {**options, "max_context": 128}
    with in_process_mesh(model_dir, 2, stage_options=stage_options, speculate="lookup") as mesh:
        spec = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
    assert spec.token_ids == expected
    assert int(spec.timings["drafted_tokens"]) > 0


def test_no_drafts_while_more_sessions_decode_than_speculation_pays_for(tiny_root):
    from orchestrator.generation import Running

    model_dir = make_tiny_model(tiny_root, "gqa")
    options = dict(speculate="lookup", speculate_max_sessions=2)
    with in_process_mesh(model_dir, 1, **options) as mesh:
        generator = mesh.orchestrator.generator
        others = {"other-1": Running(), "other-2": Running()}  # two more sessions decoding
        generator._active.update(others)
        busy = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
        for sid in others:
            del generator._active[sid]
        alone = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
    assert busy.token_ids == alone.token_ids
    assert int(busy.timings["drafted_tokens"]) == 0 and int(busy.timings["trips"]) == NEW_TOKENS
    assert int(alone.timings["drafted_tokens"]) > 0


def test_a_last_stage_that_ignores_drafts_turns_speculation_off(tiny_root, monkeypatch):
    """A stage from before verification ignores draft_tokens (an unknown field to it): it runs
    the drafts as input and answers the token after them, echoing no draft count. The
    orchestrator notices, runs the step again without drafts and stops drafting."""
    from stage_service.steps import StepInput

    real_step = StepInput.from_pb

    def old_stage(request, rows=None):
        step = real_step(request, rows)
        step.draft_tokens = 0
        return step

    monkeypatch.setattr(StepInput, "from_pb", staticmethod(old_stage))
    model_dir = make_tiny_model(tiny_root, "gqa")
    expected = reference_greedy(model_dir, PROMPT, NEW_TOKENS)
    with in_process_mesh(model_dir, 2, speculate="lookup") as mesh:
        first = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
        second = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
        why = mesh.orchestrator.generator.drafts_ignored
    assert first.token_ids == expected == second.token_ids
    assert "does not verify drafted tokens" in why and "--speculate off" in why
    assert int(second.timings["drafted_tokens"]) == 0


def test_drafts_ride_the_last_chunk_of_a_chunked_prompt(tiny_root):
    """Prompts (and replays) go in chunks; a step's drafts all go in its last chunk, after the
    token before them."""
    model_dir = make_tiny_model(tiny_root, "gqa")
    expected = reference_greedy(model_dir, PROMPT * 3, NEW_TOKENS)
    with in_process_mesh(model_dir, 2, speculate="lookup", prefill_chunk_tokens=4) as mesh:
        mesh.client.generate(token_ids=[1, 2], max_new_tokens=3)  # times a one-token step
        spec = mesh.client.generate(token_ids=PROMPT * 3, max_new_tokens=NEW_TOKENS)
    assert spec.token_ids == expected
    assert int(spec.timings["drafted_tokens"]) > 0
