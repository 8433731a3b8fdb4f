"""Linear-layer kernels on this CPU, for picking quantized stage kernels (issue 12) by measurement.

For each of the default model's linear shapes, it times y = x @ W.T at 1 and 64 rows, one torch
thread, over enough distinct weight matrices that they do not fit in the caches (a decode step
reads every weight once, from memory: timing one matrix over and over measures the cache
instead). Kernels: fp32 and bf16 `linear`; weight-only int8 (`torch._weight_int8pack_mm`, with
fp32 and bf16 activations), which computes exactly x @ dequant(W).T; fbgemm's dynamic int8
linear, which also rounds the activations to int8 (fast, but not the dequantized model's math);
dequantize-then-fp32 as the naive reference; and our own int8 and int4 (group 32) kernels
(stage_service/kernels/qlinear.c), float32 activations, weights dequantized in registers, and
its float32 one (f_linear: what a CPU stage's batch-invariant default runs).
Prints ms per matrix, GB/s of weight bytes and GFLOP/s (2 x rows x N x K a matrix).

Usage: PYTHONPATH=. python bench/cpu_kernels.py [--rows 1,64] [--threads 1] [--only NAMES]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from stage_service import cpu_kernels
from stage_service.packed import PackedFloat
from stage_service.quant import Int4Weight, Int8Weight

# SmolLM2-135M (the default model): q and o, k and v (3 kv heads of 64), gate and up, down, head
SHAPES = {
    "q,o 576x576": (576, 576),
    "k,v 192x576": (192, 576),
    "gate,up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
    "head 49152x576": (49152, 576),
}


def per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def fbgemm_dynamic(w: torch.Tensor, scale: torch.Tensor) -> Callable:
    from torch.ao.nn.quantized.dynamic import Linear

    n, k = w.shape
    lin = Linear(k, n, bias_=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the quantized tensor API it uses
        qw = torch.quantize_per_channel(
            w, scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8
        )
    lin.set_weight_bias(qw, None)
    return lin


def kernels(w: torch.Tensor) -> dict[str, tuple[Callable, int]]:
    """name -> (fn(x_fp32, x_bf16), weight bytes it reads)."""
    wq, scale = per_channel_int8(w)
    wb, sb = w.bfloat16(), scale.bfloat16()
    lin = fbgemm_dynamic(w, scale)
    n, k = w.shape
    ours8, ours4 = Int8Weight.quantize(w, 64 if n < 10000 else 0), Int4Weight.quantize(w, 32)
    found = {}
    ours, _ = cpu_kernels.load()
    if ours is not None:
        packed = PackedFloat.pack(w)

        def ours_f32(isa):
            def run(x, xb):
                ours.use_isa(isa)
                y = torch.empty(x.shape[0], n)
                ours.f_linear(x, packed, None, y)
                return y

            return run

        found["ours fp32"] = (ours_f32(None), n * k * 4)  # the best this CPU has
        if ours.use_isa(None) != "avx2":
            found["ours fp32 avx2"] = (ours_f32("avx2"), n * k * 4)
    return {
        **found,
        "fp32": (lambda x, xb: F.linear(x, w), n * k * 4),
        "bf16": (lambda x, xb: F.linear(xb, wb), n * k * 2),
        "int8 weight-only, fp32 x": (lambda x, xb: torch._weight_int8pack_mm(x, wq, scale), n * k),
        "int8 weight-only, bf16 x": (lambda x, xb: torch._weight_int8pack_mm(xb, wq, sb), n * k),
        "fbgemm dynamic int8": (lambda x, xb: lin(x), n * k),
        "dequantize + fp32": (lambda x, xb: F.linear(x, wq.float() * scale[:, None]), n * k),
        "ours int8 g64": (lambda x, xb: ours8.linear(x, None), ours8.nbytes),
        "ours int4 g32": (lambda x, xb: ours4.linear(x, None), ours4.nbytes),
    }


def measure(shape: tuple[int, int], rows: int, budget_bytes: int, repeats: int, only: str) -> dict:
    n, k = shape
    count = max(2, budget_bytes // (n * k * 4))
    gen = torch.Generator().manual_seed(0)
    sets = [kernels(torch.randn(n, k, generator=gen) * 0.02) for _ in range(count)]
    x = torch.randn(rows, k, generator=gen)
    xb = x.bfloat16()
    out = {}
    for name in sets[0]:
        if only and name not in only.split(","):
            continue
        fns = [s[name][0] for s in sets]
        for fn in fns[:2]:
            fn(x, xb)  # warm-up (packing, first-call work)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for fn in fns:
                fn(x, xb)
            times.append((time.perf_counter() - t0) / len(fns))
        ms = statistics.median(times) * 1e3
        out[name] = (ms, sets[0][name][1] / (ms / 1e3) / 1e9, 2 * rows * n * k / (ms / 1e3) / 1e9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-mb", type=int, default=256, help="fp32 weight bytes per shape")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated kernel names to run")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for rows in (int(r) for r in a.rows.split(",")):
        print(
            f"--- {rows} row(s), {a.threads} thread(s): ms per matrix "
            "(GB/s of its weights, GFLOP/s)"
        )
        for label, shape in SHAPES.items():
            budget = a.budget_mb << 20 if shape[0] < 10000 else 4 * shape[0] * shape[1] * 3
            res = measure(shape, rows, budget, a.repeats, a.only)
            cells = "  ".join(
                f"{name} {ms:.3f} ({gb:.0f}, {fl:.0f})" for name, (ms, gb, fl) in res.items()
            )
            print(f"{label:18s} {cells}")


if __name__ == "__main__":
    main()
