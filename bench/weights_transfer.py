"""Weights over the wire, measured: a mesh of stage processes started (a) on the model directory,
(b) empty with --fetch-weights and an empty cache (every tensor travels from the orchestrator),
(c) empty with the cache (b) filled (nothing should travel). Per run: the time from spawning
the processes to the orchestrator's Health SERVING, and for (b) and (c) the bytes each stage
was sent and the seconds that took (the plan's fetch_bytes/fetch_seconds). Prints each run,
then medians and the transfer rate; --json FILE writes them.

Usage (repository root, the venv's python):
  python bench/weights_transfer.py                      # default model, 2 stages, 3 runs each
  python bench/weights_transfer.py --model DIR --runs 5 --stages 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.client import Client  # noqa: E402
from client.default_model import default_model_dir  # noqa: E402
from client.launcher import LocalMesh  # noqa: E402


def run(model: str, stages: int, threads: int, cache_root: Path | None) -> dict:
    fetch = cache_root is not None
    per_stage = None
    if fetch:
        per_stage = [
            ["--fetch-weights", "--weights-cache", str(cache_root / f"stage{i}")]
            for i in range(stages)
        ]
    t0 = time.perf_counter()
    mesh = LocalMesh(
        model,
        stages,
        threads=threads,
        stage_model="" if fetch else None,
        per_stage_args=per_stage,
        extra_orchestrator_args=["--http-port", "-1"],
    )
    with mesh:
        ready_s = time.perf_counter() - t0
        with Client(mesh.address) as client:
            plan = client.plan()
            sources = [s["info"].get("weights_source", "") for s in client.stages()]
    sent = [int(s.get("fetch_bytes", 0)) for s in plan["stages"]]
    seconds = [float(s.get("fetch_seconds", 0.0)) for s in plan["stages"]]
    return {"ready_s": ready_s, "sent_bytes": sent, "fetch_seconds": seconds, "sources": sources}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="", help="model directory (default: the default model)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", default="", help="write the results here")
    a = p.parse_args()
    model = a.model or str(default_model_dir())
    work = Path(tempfile.mkdtemp(prefix="llamadist-weights-bench-"))
    results: dict[str, list[dict]] = {"local": [], "cold": [], "warm": []}
    try:
        for r in range(a.runs):  # interleaved, so that drift hits every kind alike
            cache = work / f"run{r}"
            for kind, root in (("local", None), ("cold", cache), ("warm", cache)):
                out = run(model, a.stages, a.threads, root)
                results[kind].append(out)
                print(f"run {r} {kind:5s}: ready in {out['ready_s']:.2f} s, sent "
                      f"{[round(b / 1e6, 1) for b in out['sent_bytes']]} MB in "
                      f"{[round(s, 2) for s in out['fetch_seconds']]} s, from {out['sources']}",
                      flush=True)  # fmt: skip
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {k: statistics.median(r["ready_s"] for r in v) for k, v in results.items()}
    rates = [
        b / s
        for r in results["cold"]
        for b, s in zip(r["sent_bytes"], r["fetch_seconds"], strict=True)
        if s > 0
    ]
    summary["cold_rate_mb_s_per_stage"] = statistics.median(rates) / 1e6 if rates else 0.0
    summary["cold_rate_mb_s_all"] = statistics.median(
        sum(r["sent_bytes"]) / max(r["fetch_seconds"]) / 1e6 for r in results["cold"]
    )
    summary["warm_sent_bytes"] = max(sum(r["sent_bytes"]) for r in results["warm"])
    summary["warm_over_local"] = summary["warm"] / summary["local"]
    print(json.dumps(summary, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
