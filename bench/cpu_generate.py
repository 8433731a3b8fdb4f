"""Decode speed of the mesh against transformers in-process, same weights, same run.

    .venv/bin/python bench/cpu_generate.py [--stages 2] [--tokens 128] [--repeats 3]

Runs `llamadist generate --json` (greedy, --ignore-eos) against a local mesh of N stage processes
on loopback, then transformers' `generate` in this process (1 and 2 torch threads), and prints
the medians and their ratio. Nothing runs concurrently with what is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "What is the capital of France?"


def mesh_runs(model: Path, stages: int, tokens: int, repeats: int) -> list[dict]:
    from client.launcher import LocalMesh

    llamadist = str(Path(sys.executable).parent / "llamadist")
    runs = []
    with LocalMesh(str(model), num_stages=stages) as mesh:
        cmd = [
            llamadist,
            "generate",
            "--server",
            mesh.address,
            "--json",
            "--ignore-eos",
            "--max-new-tokens",
            str(tokens),
            PROMPT,
        ]
        subprocess.run(cmd, check=True, capture_output=True)  # warm-up
        for _ in range(repeats):
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout))
    return runs


def transformers_runs(model: Path, tokens: int, repeats: int, threads: int) -> list[float]:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model))
    ref = LlamaForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    config = ref.generation_config
    config.eos_token_id, config.pad_token_id = None, 0
    speeds = []
    with torch.inference_mode():
        ref.generate(ids, generation_config=config, max_new_tokens=8, do_sample=False)
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = ref.generate(
                ids, generation_config=config, max_new_tokens=tokens, do_sample=False
            )
            speeds.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    from client.default_model import fetch_default

    model = fetch_default()
    runs = mesh_runs(model, a.stages, a.tokens, a.repeats)
    decode = statistics.median(r["timings"]["decode_tokens_per_s"] for r in runs)
    overall = statistics.median(
        len(r["token_ids"]) / (r["timings"]["total_ms"] / 1e3) for r in runs
    )
    ttft = statistics.median(r["timings"]["ttft_ms"] for r in runs)
    hop = statistics.median(r["timings"]["hop_overhead_ms"] for r in runs)
    ref = {t: statistics.median(transformers_runs(model, a.tokens, a.repeats, t)) for t in (1, 2)}
    best = max(ref.values())
    print(f"default model, {a.tokens} greedy tokens, medians of {a.repeats} runs")
    print(
        f"llamadist {a.stages} stages: decode {decode:.1f} tok/s, end-to-end {overall:.1f} tok/s, "
        f"ttft {ttft:.0f} ms, per-hop overhead {hop:.2f} ms"
    )
    for threads, speed in ref.items():
        print(f"transformers generate, {threads} thread(s): {speed:.1f} tok/s")
    print(f"ratio llamadist end-to-end / best transformers: {overall / best:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
