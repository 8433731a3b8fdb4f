"""Which weight-only quantized matmul kernels a GPU has, whether they compute x @ dequant(W).T,
and how fast they are against bf16 `F.linear`, at the 8B model's shapes (issue 12). Candidates:
torch's `_weight_int8pack_mm` (int8, a scale per output channel), torch's tinygemm
`_weight_int4pack_mm` (int4, a scale and zero per group), and int8 with a scale per group
dequantized inside a torch.compile'd `F.linear` (gpt-fast's way). Distinct weights per call, so
they come from HBM. Prints ms per matrix, GB/s of its weight bytes, and the max error against
bf16 `F.linear` on the dequantized weights.

Usage (device): PYTHONPATH=. python3 bench/gpu_quant_probe.py [--rows 1,16,64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import traceback

import torch
import torch.nn.functional as F

SHAPES = {
    "qkv 6144x4096": (6144, 4096),
    "o 4096x4096": (4096, 4096),
    "gate_up 28672x4096": (28672, 4096),
    "down 4096x14336": (4096, 14336),
}


def int4_tinygemm(w: torch.Tensor, group: int):
    """torch's tinygemm layout: w ~ (q - 8) * scale + zero, q in 0..15 per group."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    deq = (q.float() * scale[..., None] + lo[..., None]).view(n, k)
    zero = lo + 8 * scale
    packed = (q.view(n, k)[:, ::2] << 4 | q.view(n, k)[:, 1::2]).to(torch.uint8)
    wp = torch._convert_weight_to_int4pack(packed.contiguous(), 8)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return (
        (lambda x: torch._weight_int4pack_mm(x, wp, group, sz)),
        deq.to(torch.bfloat16),
        n * k // 2,
    )


def bf16(w: torch.Tensor):
    return (lambda x: F.linear(x, w)), w, w.numel() * 2


def int8_channel(w: torch.Tensor):
    scale = w.float().abs().amax(1) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    deq = (q.float() * scale[:, None]).to(torch.bfloat16)
    s = scale.to(torch.bfloat16)
    return (lambda x: torch._weight_int8pack_mm(x, q, s)), deq, q.numel()


def int8_group_compiled(w: torch.Tensor, group: int, compiled):
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    scale = g.abs().amax(-1) / 127
    q = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8)
    deq = (q.float() * scale[..., None]).view(n, k).to(torch.bfloat16)
    s = scale.to(torch.bfloat16)
    return (lambda x: compiled(x, q, s)), deq, q.numel()


def _deq_linear(x, q, s):
    n, groups, group = q.shape
    return F.linear(x, (q.to(x.dtype) * s[..., None]).view(n, groups * group))


def time_ms(fns, x, repeats: int = 5) -> float:
    for f in fns[:2]:
        f(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for f in fns:
            f(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--copies", type=int, default=6, help="distinct weight sets per shape")
    p.add_argument("--json", default="")
    a = p.parse_args()
    dev = torch.device("cuda")
    print("torch", torch.__version__, torch.cuda.get_device_name())
    torch._dynamo.config.cache_size_limit = 64  # one compile per shape and row count
    compiled = torch.compile(_deq_linear, dynamic=False)
    results: dict = {}
    for label, (n, k) in SHAPES.items():
        gen = torch.Generator(device=dev).manual_seed(0)
        ws = [
            torch.randn(n, k, device=dev, generator=gen).to(torch.bfloat16) * 0.02
            for _ in range(a.copies)
        ]
        makers = {
            "bf16": bf16,
            "int8 per channel (_weight_int8pack_mm)": int8_channel,
            "int4 g32 (tinygemm)": lambda w: int4_tinygemm(w, 32),
            "int4 g64 (tinygemm)": lambda w: int4_tinygemm(w, 64),
            "int8 g64 (compiled dequant + linear)": lambda w: int8_group_compiled(w, 64, compiled),
        }
        for name, make in makers.items():
            try:
                sets = [make(w) for w in ws]
            except Exception:  # noqa: BLE001 - a kernel this torch lacks
                results.setdefault(label, {})[name] = {
                    "error": traceback.format_exc(limit=1)[-300:]
                }
                print(f"{label:22s} {name}: unavailable: {traceback.format_exc(limit=1)[-200:]}")
                continue
            for rows in (int(r) for r in a.rows.split(",")):
                x = torch.randn(rows, k, device=dev).to(torch.bfloat16)
                try:
                    ref = F.linear(x, sets[0][1]).float()
                    got = sets[0][0](x).float()
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                    ms = time_ms([s[0] for s in sets], x)
                except Exception:  # noqa: BLE001
                    why = traceback.format_exc(limit=1)[-200:]
                    print(f"{label:22s} {name} rows {rows}: failed: {why}")
                    continue
                gbs = sets[0][2] / (ms / 1e3) / 1e9
                results.setdefault(label, {}).setdefault(name, {})[rows] = {
                    "ms": ms,
                    "gbs": gbs,
                    "rel_err": err,
                }
                speed = f"{ms:.4f} ms ({gbs:6.0f} GB/s) err {err:.1e}"
                print(f"{label:22s} {name:40s} rows {rows:3d}: {speed}")
        del ws
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
