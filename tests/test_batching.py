"""Decode steps of many sessions run as one batched forward on a stage, with the same tokens
and logits as the sessions one at a time."""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time

import pytest
import torch

from protos.sampling import Sampling
from stage_service.config import StageConfig
from stage_service.stage import Stage, StepInput
from tests.batches import count_taken
from tests.conftest import make_tiny_model, require_or_skip

SESSIONS = 8


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 101, (3 + 4 * i,), generator=g).tolist() for i in range(SESSIONS)]


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def step(session: str, start: int, ids: list[int]) -> StepInput:
    return StepInput(session, 1, start, ids, None, Sampling(), return_logits=False)


@pytest.mark.parametrize("static_kv", ["off", "on"])
def test_concurrent_decode_steps_are_batched_and_exact(tmp_path, static_kv):
    """Growable caches and static slots (the decode step of the CUDA graphs, run eagerly)."""
    model_dir = make_tiny_model(tmp_path, "gqa")
    stage = Stage(
        StageConfig(
            model=str(model_dir), static_kv=static_kv, max_context=128, batch_invariant="off"
        )
    )
    stage.load_layers(0, 4, epoch=1)
    alone = {}
    for i, p in enumerate(prompts()):  # one at a time: prefill, then two decode steps
        first = stage.run_step(step(f"alone{i}", 0, p))
        second = stage.run_step(step(f"alone{i}", len(p), [first.token_id]))
        alone[i] = (first, second)

    for i, p in enumerate(prompts()):
        stage.run_step(step(f"s{i}", 0, p))
    results: dict[int, object] = {}

    def decode(i: int, p: list[int]) -> None:
        results[i] = stage.run_step(step(f"s{i}", len(p), [alone[i][0].token_id]))

    # Hold the compute thread on a first step, let the other steps queue up behind it, then let
    # it take them as one batch.
    threads = [threading.Thread(target=decode, args=(i, p)) for i, p in enumerate(prompts())]
    taken = count_taken(stage)
    with stage.holder.compute_lock:
        threads[0].start()
        wait_for(lambda: taken() == 1)  # the compute thread waits on the lock
        for t in threads[1:]:
            t.start()
        wait_for(lambda: len(stage.batcher._queue) == SESSIONS - 1)
    for t in threads:
        t.join()
    assert max(r.batch_size for r in results.values()) == SESSIONS - 1
    for i in range(SESSIONS):
        assert results[i].token_id == alone[i][1].token_id
        assert abs(results[i].logprob - alone[i][1].logprob) < 1e-5
    stage.batcher.close()


def test_one_sessions_failure_does_not_fail_its_batch(tmp_path, monkeypatch):
    import stage_service.sampling as sampling_module

    model_dir = make_tiny_model(tmp_path, "gqa")
    stage = Stage(StageConfig(model=str(model_dir)))
    stage.load_layers(0, 4, epoch=1)
    real_sample = sampling_module.sample

    def flaky(logits, params, seen, generator):
        if seen[:1] == [66]:  # the session whose prompt starts with 66
            raise RuntimeError("sampling failed")
        return real_sample(logits, params, seen, generator)

    monkeypatch.setattr(sampling_module, "sample", flaky)
    outcomes: dict[str, object] = {}
    sampled = Sampling(temperature=0.7, seed=1)  # not greedy: sampled row by row

    def run(name: str, first: int) -> None:
        try:
            outcomes[name] = stage.run_step(StepInput(name, 1, 0, [first, 2, 3], None, sampled))
        except RuntimeError as err:
            outcomes[name] = err

    first = threading.Thread(target=run, args=("first", 9))
    threads = [threading.Thread(target=run, args=(n, f)) for n, f in
               (("a", 5), ("bad", 66), ("b", 7))]  # fmt: skip
    taken = count_taken(stage)
    with stage.holder.compute_lock:  # queue the three behind a first step, then run them as one
        first.start()
        wait_for(lambda: taken() == 1)
        for t in threads:
            t.start()
        wait_for(lambda: len(stage.batcher._queue) == 3)
    first.join()
    for t in threads:
        t.join()
    assert isinstance(outcomes["bad"], RuntimeError)
    assert outcomes["a"].token_id >= 0 and outcomes["b"].token_id >= 0
    assert outcomes["a"].batch_size == 3
    stage.batcher.close()


@pytest.mark.slow
def test_compiled_decode_parts_give_the_same_tokens(tmp_path):
    """--compile (the decode step's pure ends through torch.compile) against the same step
    without it, for several sessions at once (CPU, float32: equal within rounding)."""
    cxx = os.environ.get("CXX", "g++")  # what torch.compile's CPU backend (inductor) calls
    if shutil.which(cxx) is None:
        require_or_skip("compile", f"torch.compile on CPU needs a C++ compiler: no {cxx}")
    model_dir = make_tiny_model(tmp_path, "gqa")
    outs = {}
    for compile in (False, True):
        config = StageConfig(
            model=str(model_dir),
            static_kv="on",
            max_context=64,
            compile=compile,
            batch_invariant="off",
        )
        stage = Stage(config)
        stage.load_layers(0, 4, epoch=1)
        for i, p in enumerate(prompts()[:4]):
            stage.run_step(step(f"s{i}", 0, p))
        answers, outs[compile] = queue.SimpleQueue(), []
        for k in range(3):  # three decode steps of the four sessions, each batch one forward
            steps = [step(f"s{i}", len(p) + k, [7 + k]) for i, p in enumerate(prompts()[:4])]
            stage.run_steps(steps, answers.put)
            outs[compile].append(answers.get(timeout=60))
        stage.batcher.close()
    for eager_jobs, compiled_jobs in zip(outs[False], outs[True], strict=True):
        for eager, compiled in zip(eager_jobs, compiled_jobs, strict=True):
            assert eager.out.batch_size == compiled.out.batch_size == 4
            assert compiled.out.token_id == eager.out.token_id
            assert abs(compiled.out.logprob - eager.out.logprob) < 1e-4
