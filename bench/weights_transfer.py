"""Weights over the wire, measured: a mesh of stage processes started (a) on the model directory,
(b) empty with --fetch-weights and an empty cache (every tensor travels from the orchestrator),
(c) empty with the cache (b) filled (nothing should travel). Per run: the time from spawning
the processes to the orchestrator's Health SERVING, and for (b) and (c) the bytes each stage
was sent and the seconds that took (the plan's fetch_bytes/fetch_seconds). Prints each run,
then medians and the transfer rate; --json FILE writes them.

Before the runs it hashes every tensor once as the orchestrator does (kept in its hash cache,
so the runs do not pay it; timed and reported), and with --cp times `cp` of the model's
safetensors files into the cache's filesystem: the issue's baseline for the same bytes.

Usage (repository root, the venv's python):
  python bench/weights_transfer.py                      # default model, 2 stages, 3 runs each
  python bench/weights_transfer.py --model DIR --runs 5 --stages 2 --json out.json
  python bench/weights_transfer.py --model DIR --stage-args "--device cuda" --cp --work /data
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.client import Client  # noqa: E402
from client.default_model import default_model_dir  # noqa: E402
from client.launcher import LocalMesh  # noqa: E402
from orchestrator.weight_shipping import WeightShipper  # noqa: E402
from protos.shared.model_files import model_fingerprint  # noqa: E402


def run(
    model: str, stages: int, threads: int, cache_root: Path | None, stage_args: list[str]
) -> dict:
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
        extra_stage_args=stage_args,
        extra_orchestrator_args=["--http-port", "-1"],
        ready_timeout_s=900,
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
    p.add_argument("--stage-args", default="", help="more stage flags, e.g. '--device cuda'")
    p.add_argument("--cp", action="store_true", help="time cp of the model's files too")
    p.add_argument("--work", default=None, help="where the caches go (default: a tmp dir)")
    a = p.parse_args()
    model = a.model or str(default_model_dir())
    stage_args = a.stage_args.split()
    work = Path(tempfile.mkdtemp(prefix="llamadist-weights-bench-", dir=a.work))
    results: dict[str, list[dict]] = {"local": [], "cold": [], "warm": []}
    summary: dict = {}
    shipper = WeightShipper(Path(model), model_fingerprint(Path(model)))
    shipper._hashes.clear()  # timed from nothing, as on an orchestrator's first start
    t0 = time.perf_counter()
    for name in shipper.stored:
        shipper.sha256(name)
    shipper.manifest([])  # writes the hash cache
    summary["hash_all_s"] = time.perf_counter() - t0
    model_bytes = sum(s.size for s in shipper.stored.values())
    summary["model_bytes"] = model_bytes
    print(f"hashing {model_bytes / 1e6:.0f} MB (once per model): {summary['hash_all_s']:.1f} s")
    if a.cp:
        files = sorted(Path(model).glob("*.safetensors"))
        t0 = time.perf_counter()
        subprocess.run(["cp", *map(str, files), str(work)], check=True)
        subprocess.run(["sync"], check=True)
        summary["cp_s"] = time.perf_counter() - t0
        for f in files:
            (work / f.name).unlink()
        print(f"cp of the model's files (+ sync): {summary['cp_s']:.2f} s")
    try:
        for r in range(a.runs):  # interleaved, so that drift hits every kind alike
            cache = work / f"run{r}"
            for kind, root in (("local", None), ("cold", cache), ("warm", cache)):
                out = run(model, a.stages, a.threads, root, stage_args)
                results[kind].append(out)
                print(f"run {r} {kind:5s}: ready in {out['ready_s']:.2f} s, sent "
                      f"{[round(b / 1e6, 1) for b in out['sent_bytes']]} MB in "
                      f"{[round(s, 2) for s in out['fetch_seconds']]} s, from {out['sources']}",
                      flush=True)  # fmt: skip
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary |= {k: statistics.median(r["ready_s"] for r in v) for k, v in results.items()}
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
    summary["cold_fetch_s"] = statistics.median(max(r["fetch_seconds"]) for r in results["cold"])
    if "cp_s" in summary:
        summary["cold_fetch_over_cp"] = summary["cold_fetch_s"] / summary["cp_s"]
    print(json.dumps(summary, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
