"""Prompt lookup, adaptive k and the speculation policy, without a server."""

from __future__ import annotations

import pytest

from orchestrator.drafting import PromptLookup
from orchestrator.speculation import AdaptiveK, SpeculationPolicy, StepCosts
from protos.errors import FailedPrecondition, InvalidArgument
from protos.sampling import Speculate


def test_lookup_continues_the_latest_match_of_the_longest_ngram():
    session = PromptLookup().start([])
    text = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 0, 2, 3]
    # "2 3" ended at 3 and at 8 (latest), "0 2 3" nowhere: the 2-gram's latest continuation
    assert session.propose(text, 3) == [4, 5, 6]
    assert session.propose(text, 1) == [4]
    assert session.propose([*text, 4], 2) == [5, 6]  # grows incrementally
    assert session.propose([7, 8], 4) == []  # a new text: re-indexed, nothing to match
    assert session.propose([5, 5, 5], 4) == [5]  # the only continuation of "5 5" is one token


def test_lookup_of_nothing():
    session = PromptLookup().start([1])
    assert session.propose([1], 4) == []
    assert session.propose([1, 2, 3], 0) == []


def costs(*ms: float) -> StepCosts:
    """Step costs of 1, 2, .. rows."""
    c = StepCosts()
    for rows, value in enumerate(ms, start=1):
        c.observe(rows, value)
    return c


def test_adaptive_k_waits_for_the_baseline_then_tries_unmeasured_sizes():
    k = AdaptiveK(4)
    assert k.next_k(remaining=100) == 0  # a one-token step is timed first
    k.record(0, 0, wall_ms=10.0)
    assert k.next_k(remaining=100) == 4  # others assumed as cheap until measured
    assert k.next_k(remaining=3) == 2  # the step's own token comes after the drafts


def test_adaptive_k_weighs_acceptance_against_measured_cost():
    flat = AdaptiveK(4, costs(10, 10, 10, 10, 10))  # a GPU: rows are nearly free
    assert flat.acceptance == 0.5 and flat.next_k(100) == 4
    steep = AdaptiveK(4, costs(13, 16, 25, 33, 38))  # int8 on a CPU (measured here)
    assert steep.next_k(100) == 1  # 1.5 tokens / 16 ms beats 1 / 13 ms and 1.75 / 25 ms
    for _ in range(6):
        steep.record(1, 0, wall_ms=16)  # drafts keep failing
    assert steep.acceptance < 0.2
    assert [steep.next_k(100) for _ in range(8)] == [0] * 7 + [1]  # a probe now and then
    for _ in range(20):
        steep.record(4, 4, wall_ms=38)  # the text turned repetitive: every draft kept
    assert steep.acceptance > 0.9 and steep.next_k(100) == 4
    assert (steep.drafted, steep.accepted) == (6 + 80, 80)


def test_policy_refuses_unknown_and_unavailable_modes():
    policy = SpeculationPolicy(Speculate.LOOKUP, drafters={Speculate.LOOKUP: PromptLookup()})
    assert policy.mode("") is Speculate.LOOKUP
    assert policy.mode("off") is Speculate.OFF
    assert policy.session(Speculate.OFF, [1]) is None
    with pytest.raises(InvalidArgument, match="one of off, lookup, draft"):
        policy.mode("fast")
    with pytest.raises(FailedPrecondition, match="--draft-model DIR"):
        policy.mode("draft")


def test_speculation_flags_are_checked(tmp_path, capsys):
    from client.cli import main
    from orchestrator.config import OrchestratorConfig
    from protos.shared.knobs import ConfigError

    (tmp_path / "config.json").write_text("{}")
    model = str(tmp_path)
    for k in (0, 17, 100):
        with pytest.raises(ConfigError, match=rf"^--speculate-k must be 1\.\.16, got {k}$"):
            OrchestratorConfig(model=model, stages=("a:1",), speculate_k=k)
    with pytest.raises(ConfigError, match="^--speculate must be one of off, lookup, draft"):
        OrchestratorConfig(model=model, stages=("a:1",), speculate="fast")
    with pytest.raises(ConfigError, match="--speculate draft needs --draft-model DIR"):
        OrchestratorConfig(model=model, stages=("a:1",), speculate="draft")
    with pytest.raises(ConfigError, match="^--draft-model /nonexistent: no config.json there"):
        OrchestratorConfig(model=model, stages=("a:1",), draft_model="/nonexistent")
    assert main(["up", "--model", model, "--speculate-k", "0"]) == 2
    assert "--speculate-k must be 1..16, got 0" in capsys.readouterr().err
    assert main(["generate", "hi", "--speculate", "fast"]) == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
