"""Float matrices in the layout of kernels/qlinear.c's f_linear, for a CPU range whose every step
runs in C (the batch-invariant mode, fused_layers.py): blocks of 16 output channels, each block
K-major, so that the kernel's outer-product tiles read each weight once per tile of rows; the
last N % 16 channels as plain rows.

A packed matrix replaces the [N, K] tensor it was made from (no second copy is held) and keeps
working wherever a weight matrix does: `linear`, `embedding` (a tied head is the embedding too)
and `dequantize` (the [N, K] matrix back) compute what the tensor computed, up to float32 sums
in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stage_service import cpu_kernels

BLOCK = 16  # output channels a block (FB in qlinear.c)


class PackedFloat:
    def __init__(self, data: torch.Tensor, shape: tuple[int, int]):
        self.data = data  # 1-D, N * K values in the matrix's own dtype, laid out as qlinear.c says
        self.shape = tuple(shape)  # (N outputs, K inputs)

    @classmethod
    def pack(cls, w: torch.Tensor) -> PackedFloat:
        n, k = w.shape
        full = n // BLOCK * BLOCK  # whole blocks; the last n % 16 channels stay plain rows
        blocks = w[:full].reshape(full // BLOCK, BLOCK, k).transpose(1, 2)
        return cls(torch.cat([blocks.reshape(-1), w[full:].reshape(-1)]), (n, k))

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def _blocks(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        n, k = self.shape
        full = n // BLOCK * BLOCK
        blocks = self.data[: full * k].view(full // BLOCK, k, BLOCK)
        return full, blocks, self.data[full * k :].view(n - full, k)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [N, K] matrix it was packed from."""
        full, blocks, plain = self._blocks()
        rows = torch.cat([blocks.transpose(1, 2).reshape(full, self.shape[1]), plain])
        return rows.to(dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernels = cpu_kernels.load()[0]
        if kernels is None:
            return F.linear(x, self.dequantize(x.dtype), bias)
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        y = torch.empty(flat.shape[0], self.shape[0])
        kernels.f_linear(flat, self, None if bias is None else bias.float().contiguous(), y)
        return y.view(*x.shape[:-1], -1).to(x.dtype)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the matrix (an embedding lookup)."""
        full, blocks, plain = self._blocks()
        if full == 0:
            return plain[ids].to(dtype)
        inner = ids.clamp(max=full - 1)
        rows = blocks[inner // BLOCK, :, inner % BLOCK]
        if full < self.shape[0]:  # ids among the plain rows
            tail = plain[(ids - full).clamp(min=0)]
            rows = torch.where((ids < full)[:, None], rows, tail)
        return rows.to(dtype)
