"""What glibc's thresholds cost a hop (protos/shared/allocator.py): a stage's per-message work on
one 64-step batch of 4096-wide bf16 rows (parse the incoming StepBatch, route each step on, pack
the rows, serialize), timed with the default malloc and with keep_freed_buffers(), each in a
fresh process. Prints the medians and the minor page faults a message.

    python -m bench.malloc_probe [--rows 64] [--width 4096] [--messages 300]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(rows: int, width: int, messages: int) -> dict:
    import torch

    from protos import llamadist_pb2 as pb
    from stage_service.forwarding import routed_onward, step_batches

    template = pb.StepRequest(session_id="s" * 16, plan_epoch=3, route=["a:1", "b:2"])
    steps = []
    for i in range(rows):
        step = pb.StepRequest()
        step.CopyFrom(template)
        step.start_pos, step.request_id = 100 + i, i + 1
        step.token_ids.append(5)
        steps.append(step)
    wire = pb.StepBatch(steps=steps).SerializeToString()
    hidden = torch.randn(rows, width, dtype=torch.bfloat16)

    def one() -> int:
        batch = pb.StepBatch.FromString(wire)
        onward = [routed_onward(r, 1000, rows) for r in batch.steps]
        out = step_batches(list(zip(onward, hidden.split(1), strict=True)))
        return sum(len(m.SerializeToString()) for m in out)

    for _ in range(20):
        one()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(messages):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"median_us": statistics.median(times) * 1e6, "faults_per_message": faults / messages}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if a.child == "kept":
            from protos.shared.allocator import keep_freed_buffers

            assert keep_freed_buffers(), "not glibc"
        print(json.dumps(measure(a.rows, a.width, a.messages)))
        return 0
    results = {}
    for mode in ("default", "kept", "default", "kept"):  # alternating, medians of both
        cmd = [sys.executable, "-m", "bench.malloc_probe", "--child", mode]
        cmd += ["--rows", str(a.rows), "--width", str(a.width), "--messages", str(a.messages)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.setdefault(mode, []).append(json.loads(out))
    for mode, runs in results.items():
        us = statistics.median(r["median_us"] for r in runs)
        faults = statistics.median(r["faults_per_message"] for r in runs)
        print(f"{mode:8s} malloc: {us:7.0f} us a message, {faults:5.0f} page faults a message")
    base = statistics.median(r["median_us"] for r in results["default"])
    kept = statistics.median(r["median_us"] for r in results["kept"])
    print(f"kept / default: {kept / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
