"""Where a GPU stage's decode step goes (bench/GPU_NOTES.md): one 16-layer bf16 range of the
benchmark model on cuda:0 with static KV slots, no gRPC. For the decode step as it is and with
--compile: load + capture time, one step through Stage.run_step (the compute thread) and through
the static decoder alone at 1 and 64 rows; then the GPU kernels of one 64-row replay of the
last configuration by total time (torch.profiler)."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_model import make_model  # noqa: E402
from protos.sampling import Sampling  # noqa: E402
from stage_service.config import StageConfig  # noqa: E402
from stage_service.stage import Stage, StepInput  # noqa: E402


def median_ms(fn, n: int = 40) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]) * 1e3


def probe(model: Path, compile: bool) -> Stage:
    config = StageConfig(
        model=str(model),
        device="cuda:0",
        dtype="bfloat16",
        kv_cache_mb=8000,
        max_context=1024,
        compile=compile,
    )
    stage = Stage(config)
    t0 = time.perf_counter()
    stage.load_layers(0, 16, epoch=1)
    name = "compiled" if compile else "eager parts"
    print(f"[{name}] load + capture {time.perf_counter() - t0:.1f} s")
    prompt = list(range(1, 33))
    for i in range(64):
        stage.run_step(StepInput(f"s{i}", 1, 0, prompt, None, Sampling()))
    length = [32]

    def step() -> None:
        stage.run_step(StepInput("s0", 1, length[0], [5], None, Sampling()))
        length[0] += 1

    print(f"[{name}] Stage.run_step, 1 row: {median_ms(step):.2f} ms")
    decoder = stage.loaded.decoder
    slots = list(range(64))
    for rows in (1, 64):
        ms = median_ms(lambda r=rows: decoder.run(slots[:r], [100] * r, [7] * r, None).cpu())
        print(f"[{name}] decoder.run, {rows} rows: {ms:.2f} ms")
    return stage


def main() -> None:
    model = Path("/tmp/llama3-8b-random")
    make_model(model)
    stage = probe(model, compile=False)
    stage.batcher.close()
    del stage
    gc.collect()
    torch.cuda.empty_cache()
    stage = probe(model, compile=True)
    decoder = stage.loaded.decoder
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.run(list(range(64)), [100] * 64, [7] * 64, None).cpu()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
