"""A short matmul micro-benchmark run once at stage start: the speed (GFLOP/s) the compute and
mixed partition strategies weigh stages by. Shaped like decode work (a few rows against a
large weight matrix), so that it measures what a decode step is bound by."""

from __future__ import annotations

import time

import torch


def measure_gflops(device: torch.device, dtype: torch.dtype, budget_s: float = 0.2) -> float:
    rows, size = 8, 2048
    x = torch.randn(rows, size, device=device).to(dtype)
    w = torch.randn(size, size, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.nn.functional.linear(x, w)  # warm-up
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        for _ in range(8):
            torch.nn.functional.linear(x, w)
        iters += 8
        sync()
    elapsed = time.perf_counter() - start
    return 2 * rows * size * size * iters / elapsed / 1e9
