"""What a speculative verify step costs on a GPU against a one-token step (issue 15), run on a
lent machine by the device tool: `python3 bench/gpu_verify.py` after bench/gpu.sh's protobuf
step. Makes the Llama-3-8B-shaped random bf16 model of bench/gpu_model.py, loads it as two
in-process stages on cuda:0 (static KV, CUDA graphs, as served) and times one session's steps
of 1, 2, 3, 5 and 8 rows (a token and 0..7 drafts) through both stages, median of 30 each, at
a context of ~512. Random weights say nothing about acceptance (that is the model's and the
prompts'); they do say what a trip of k+1 rows costs, so speedup = tokens per trip x
t(1 row) / t(k+1 rows). It also checks that a verify step whose drafts are the plain greedy
tokens keeps them all (bf16 rounding of a 5-row step against 1-row steps) and prints a table
and writes gpu_verify.json to $OUT.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_model import make_model  # noqa: E402
from protos.sampling import Sampling  # noqa: E402
from stage_service.config import StageConfig  # noqa: E402
from stage_service.stage import Stage, StepInput  # noqa: E402

ROWS = (1, 2, 3, 5, 8)
GREEDY = Sampling()


def step(stages: list[Stage], session: str, pos: int, tokens: list[int], drafts: int):
    hidden = None
    for stage in stages:
        out = stage.run_step(StepInput(session, 1, pos, tokens, hidden, GREEDY, False, drafts))
        hidden = out.hidden
    return out


def main() -> int:
    out_dir = Path(os.environ.get("OUT", "."))
    model = Path("/tmp/llama8b-random")
    t0 = time.perf_counter()
    make_model(model)
    print(f"model made in {time.perf_counter() - t0:.0f} s", flush=True)
    config = dict(model=str(model), device="cuda:0", max_context=1024, max_batch=16)
    stages = [Stage(StageConfig(**config)) for _ in range(2)]
    t0 = time.perf_counter()
    stages[0].load_layers(0, 16, epoch=1)
    stages[1].load_layers(16, 32, epoch=1)
    print(f"stages loaded (graphs captured) in {time.perf_counter() - t0:.0f} s", flush=True)
    prompt = [(i * 7919) % 128000 + 1 for i in range(512)]
    results: dict = {"step_ms": {}}
    step(stages, "timing", 0, prompt, 0)
    for rows in ROWS:
        times = []
        for _ in range(30):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step(stages, "timing", len(prompt), [5] * rows, rows - 1)
            times.append((time.perf_counter() - t) * 1e3)
        results["step_ms"][rows] = statistics.median(times)
    base = results["step_ms"][1]
    # Greedy tokens one by one, then one verify step carrying them as drafts.
    first = step(stages, "plain", 0, prompt, 0).token_id
    plain, pos = [first], len(prompt)
    for _ in range(8):
        plain.append(step(stages, "plain", pos, plain[-1:], 0).token_id)
        pos += 1
    step(stages, "spec", 0, prompt, 0)
    verdict = step(stages, "spec", len(prompt), plain[:5], 4)
    results["verify_kept_of_4"] = verdict.accepted_drafts
    results["verify_token_matches"] = verdict.token_id == plain[verdict.accepted_drafts + 1]
    print("rows  ms/step  x one-token step  break-even tokens/trip")
    for rows, ms in results["step_ms"].items():
        print(f"{rows:4d}  {ms:7.2f}  {ms / base:6.2f}x  {ms / base:6.2f}")
    print(f"verify of 4 plain greedy tokens as drafts kept {verdict.accepted_drafts}")
    (out_dir / "gpu_verify.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
