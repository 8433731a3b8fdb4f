"""What the batch-invariant mode (#22) costs on a CPU, in one run: the default model through a
2-stage mesh on this host (one thread per stage), default vs --batch-invariant, for float32 and
int8 stages: batch-1 decode tok/s (128 tokens, median of 3) and aggregate tok/s with 32
sessions at once (32 tokens each), speculation off. Rounds alternate (default, invariant,
default, invariant) so that a noisy neighbour hits both; medians over rounds.

    .venv/bin/python bench/cpu_invariant.py [--rounds 2] [--formats none,int8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.mesh import PROMPT, aggregate, batch1  # noqa: E402
from client.client import Client  # noqa: E402
from client.default_model import fetch_default  # noqa: E402
from client.launcher import LocalMesh  # noqa: E402
from stage_service.cpu_kernels import cpu_flags  # noqa: E402


def measure(model: Path, fmt: str, invariant: bool) -> dict:
    extra = ["--quantize", fmt, "--batch-invariant", "on" if invariant else "off"]
    with LocalMesh(str(model), num_stages=2, port=0, threads=1, extra_stage_args=extra) as mesh:
        with Client(mesh.address, timeout_s=600) as client:
            client.generate(prompt=PROMPT, max_new_tokens=8, ignore_eos=True, speculate="off")
            b = batch1(client, 128, 3, prompt=PROMPT, speculate="off")
        many = aggregate(
            lambda: Client(mesh.address, timeout_s=600), 32, 32, prompt=PROMPT, speculate="off"
        )
    return {"batch1_tok_s": b["decode_tokens_per_s"], "sessions32_tok_s": many}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--formats", default="none,int8")
    p.add_argument("--out", default="bench-results/cpu_invariant.json")
    a = p.parse_args()
    model = fetch_default()
    kinds = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f == "avx2")
    results: dict = {"cpu_flags": kinds, "runs": []}
    for fmt in a.formats.split(","):
        for _ in range(a.rounds):
            for invariant in (False, True):
                run = {"format": fmt, "invariant": invariant, **measure(model, fmt, invariant)}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
    summary = {}
    for fmt in a.formats.split(","):
        for key in ("batch1_tok_s", "sessions32_tok_s"):
            med = {
                inv: statistics.median(
                    r[key] for r in results["runs"] if r["format"] == fmt and r["invariant"] == inv
                )
                for inv in (False, True)
            }
            summary[f"{fmt}_{key}"] = {"default": med[False], "invariant": med[True],
                                       "ratio": med[True] / med[False]}  # fmt: skip
    results["summary"] = summary
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
