"""Decode steps of many sessions run as one batched forward on a stage, with the same tokens
and logits as the sessions one at a time."""

from __future__ import annotations

import threading
import time

import torch

from protos.sampling import Sampling
from stage_service.config import StageConfig
from stage_service.stage import Stage, StepInput
from tests.conftest import make_tiny_model

SESSIONS = 8


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 101, (3 + 4 * i,), generator=g).tolist() for i in range(SESSIONS)]


def step(session: str, start: int, ids: list[int]) -> StepInput:
    return StepInput(session, 1, start, ids, None, Sampling(), return_logits=False)


def test_concurrent_decode_steps_are_batched_and_exact(tmp_path):
    model_dir = make_tiny_model(tmp_path, "gqa")
    stage = Stage(StageConfig(model=str(model_dir)))
    stage.load_layers(0, 4, epoch=1)
    alone = {}
    for i, p in enumerate(prompts()):  # one at a time: prefill, then two decode steps
        first = stage.forward(step(f"alone{i}", 0, p))
        second = stage.forward(step(f"alone{i}", len(p), [first.token_id]))
        alone[i] = (first, second)

    for i, p in enumerate(prompts()):
        stage.forward(step(f"s{i}", 0, p))
    results: dict[int, object] = {}

    def decode(i: int, p: list[int]) -> None:
        results[i] = stage.forward(step(f"s{i}", len(p), [alone[i][0].token_id]))

    # Hold the compute thread so that the steps queue up, then let it take them as one batch.
    with stage._compute:
        threads = [threading.Thread(target=decode, args=(i, p)) for i, p in enumerate(prompts())]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(stage.batcher._queue) < SESSIONS - 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join()
    assert max(r.batch_size for r in results.values()) == SESSIONS - 1
    for i in range(SESSIONS):
        assert results[i].token_id == alone[i][1].token_id
        assert abs(results[i].logprob - alone[i][1].logprob) < 1e-5
    stage.batcher.close()
