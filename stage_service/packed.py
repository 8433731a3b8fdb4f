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


def pack_rows(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the kernels' layout, 1-D: whole blocks of 16 rows K-major, then the last
    N % 16 rows as they are (any dtype: int8 matrices share it)."""
    n, k = w.shape
    full = n // BLOCK * BLOCK
    blocks = w[:full].reshape(full // BLOCK, BLOCK, k).transpose(1, 2)
    return torch.cat([blocks.reshape(-1), w[full:].reshape(-1)])


def _parts(data: torch.Tensor, n: int, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    full = n // BLOCK * BLOCK
    return full, data[: full * k].view(full // BLOCK, k, BLOCK), data[full * k :].view(n - full, k)


def unpack_rows(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """pack_rows undone: the [N, K] matrix."""
    full, blocks, plain = _parts(data, n, k)
    return torch.cat([blocks.transpose(1, 2).reshape(full, k), plain])


def pick_rows(data: torch.Tensor, n: int, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the packed [N, K] matrix."""
    full, blocks, plain = _parts(data, n, k)
    if full == 0:
        return plain[ids]
    inner = ids.clamp(max=full - 1)
    rows = blocks[inner // BLOCK, :, inner % BLOCK]
    if full < n:  # ids among the plain rows
        rows = torch.where((ids < full)[:, None], rows, plain[(ids - full).clamp(min=0)])
    return rows


class PackedFloat:
    def __init__(self, data: torch.Tensor, shape: tuple[int, int]):
        self.data = data  # pack_rows of the matrix, in its own dtype
        self.shape = tuple(shape)  # (N outputs, K inputs)

    @classmethod
    def pack(cls, w: torch.Tensor) -> PackedFloat:
        return cls(pack_rows(w), w.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [N, K] matrix it was packed from."""
        return unpack_rows(self.data, *self.shape).to(dtype or self.dtype)

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
        return pick_rows(self.data, *self.shape, ids).to(dtype)
