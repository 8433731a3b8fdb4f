"""Where a GPU stage's decode step goes (bench/GPU_NOTES.md): one 16-layer bf16 range of the
benchmark model on cuda:0, a decode step timed (a) through Stage.forward (the batcher's compute
thread), (b) calling RangeModel.forward directly on this thread; medians of 50 steps."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_bench import make_model  # noqa: E402
from protos.sampling import Sampling  # noqa: E402
from stage_service.config import StageConfig  # noqa: E402
from stage_service.model import Segment  # noqa: E402
from stage_service.stage import Stage, StepInput  # noqa: E402


def main() -> None:
    model = Path("/tmp/llama3-8b-random")
    make_model(model)
    stage = Stage(StageConfig(model=str(model), device="cuda:0", dtype="bfloat16"))
    stage.load_layers(0, 16, epoch=1)
    prompt = list(range(1, 33))
    stage.forward(StepInput("a", 1, 0, prompt, None, Sampling()))
    times = []
    for pos in range(32, 96):
        t0 = time.perf_counter()
        stage.forward(StepInput("a", 1, pos, [5], None, Sampling()))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(f"Stage.forward (compute thread): {statistics.median(times[10:]) * 1e3:.2f} ms")
    loaded = stage.loaded
    session = loaded.cache.begin_step("b", 0, 32)
    ids = torch.tensor(prompt, device="cuda:0")
    loaded.model.forward([Segment(slice(0, 32), 0, session.kv)], ids, None)
    session.length = 32
    times = []
    for pos in range(32, 96):
        session = loaded.cache.begin_step("b", pos, 1)
        t0 = time.perf_counter()
        out = loaded.model.forward([Segment(slice(0, 1), pos, session.kv)], ids[:1], None)
        out.cpu()
        times.append(time.perf_counter() - t0)
        session.length = pos + 1
    print(f"RangeModel.forward (this thread): {statistics.median(times[10:]) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
