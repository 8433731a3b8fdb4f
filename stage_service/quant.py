"""Weight-only quantization of a stage's linear layers, done at load from the float weights.

- int8: symmetric, one scale per output channel: w = q * scale, q in [-127, 127].
- int4: asymmetric, one scale and one minimum per group of `group` inputs of an output channel:
  w = q * scale + minimum, q in [0, 15] (llama.cpp's Q4_1 rule; the minimum keeps groups whose
  weights are not centred on zero from wasting half of the 16 levels).
- The embedding and the head are int8 per row under both settings: the head is the largest
  single matrix a decode step reads (a fifth of SmolLM2-135M's bytes), and 4 bits there cost
  the most quality; a tied head stays one matrix with the embedding.
- Norms and biases stay in the stage's dtype.

A quantized matrix is its packed data plus what `dequantize()` makes of it: the float weights
that transformers runs when we check exactness (tests write them to a safetensors directory).
`linear()` computes x @ dequantize().T + bias: on x86-64 CPUs with AVX2 by the kernels of
cpu_kernels.py without ever making the float matrix, elsewhere by torch on the dequantized
matrix (correct, not fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protos.errors import InvalidArgument
from stage_service import cpu_kernels
from stage_service.packed import BLOCK, pack_rows, pick_rows, unpack_rows

ALIGN = 16  # the kernels read 16 inputs at a time
BLOCK_BYTES = 512 << 10  # int4 weights dequantized at a time for many rows (L2-sized)


class _Quantized:
    """What int8 and int4 matrices share: the CPU kernel path, the torch fallback."""

    shape: tuple[int, int]  # (N outputs, K inputs)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernels = cpu_kernels.load()[0] if x.device.type == "cpu" else None
        if kernels is None:  # another device, or no kernels here: correct, not fast
            return F.linear(x, self.dequantize(x.dtype), bias)
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        b = None if bias is None else bias.float().contiguous()
        y = self._many(kernels, flat, b)
        if y is None:
            y = torch.empty(flat.shape[0], self.shape[0])
            self._kernel(kernels, flat, b, y)
        return y.view(*x.shape[:-1], -1).to(x.dtype)

    def _many(self, kernels, x, bias) -> torch.Tensor | None:
        """y by another path where it is faster for this many rows (None: the kernel's)."""
        return None

    def _kernel(self, kernels, x, bias, y) -> None:
        raise NotImplementedError


class Int8Weight(_Quantized):
    # The kernel converts each weight once per tile of rows (qlinear.c): on the AVX2 EPYC it
    # measured faster than torch on dequantized blocks from 64 rows on, as fast below (on the
    # Xeon about the same: bench/CPU_NOTES.md, 2026-12-03 fifth session): it takes every step.

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, group: int, shape):
        self.data = data  # int8, packed.pack_rows of the [N, K] levels (layout in qlinear.c)
        self.scale = scale  # float32 [N, groups]
        self.group = group  # inputs per scale; K: one scale per row
        self.shape = tuple(shape)

    @classmethod
    def quantize(cls, w: torch.Tensor, group: int = 0) -> Int8Weight:
        """Symmetric: scale = max |w| / 127 over each group of `group` inputs (0: the row)."""
        w = w.float()
        n, k = w.shape
        group = group or k
        scale = torch.stack([g.abs().amax(dim=1) for g in w.split(group, dim=1)], dim=1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / safe[:, _per_input(k, group, w.device)]).clamp_(-127, 127)
        q = q.to(torch.int8)
        return cls(pack_rows(q), scale.contiguous(), group, (n, k))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def rows(self) -> torch.Tensor:
        """The int8 values as [N, K]."""
        return unpack_rows(self.data, *self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        expand = _per_input(self.shape[1], self.group, self.scale.device)
        return (self.rows().float() * self.scale[:, expand]).to(dtype)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the dequantized matrix (an embedding lookup)."""
        q = pick_rows(self.data, *self.shape, ids)
        scale = self.scale[ids][:, _per_input(self.shape[1], self.group, ids.device)]
        return (q.float() * scale).to(dtype)

    def _kernel(self, kernels, x, bias, y) -> None:
        kernels.q8_linear(x, self.data, self.group, self.scale, bias, y)


class Int4Weight(_Quantized):
    # From this many rows on, outside the batch-invariant mode, torch's matmul on dequantized
    # blocks beats the tile kernel, which converts each weight once per 3 rows on AVX2
    # (bench/CPU_NOTES.md, 2026-12-03 fifth session: 1536x576 at 8 rows 0.79 against 0.94 ms,
    # at 17 1.40 against 1.84, at 64 5.6 against 2.1).
    many_rows = 17

    def __init__(self, data: torch.Tensor, scale, minimum, group: int, shape):
        self.data = data  # uint8, two weights a byte, layout in kernels/qlinear.c
        self.scale = scale  # float32 [N, groups]
        self.minimum = minimum  # float32 [N, groups]
        self.group = group
        self.shape = tuple(shape)

    @classmethod
    def quantize(cls, w: torch.Tensor, group: int) -> Int4Weight:
        q, scale, lo = int4_levels(w, group)
        return cls(_pack4(q), scale.contiguous(), lo.contiguous(), group, q.shape)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes + self.minimum.nbytes

    def levels(self) -> torch.Tensor:
        """The levels 0..15 as [N, K] uint8."""
        return _unpack4(self.data, *self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        expand = _per_input(self.shape[1], self.group, self.scale.device)
        q = self.levels().float()
        return (q * self.scale[:, expand] + self.minimum[:, expand]).to(dtype)

    def _kernel(self, kernels, x, bias, y) -> None:
        kernels.q4_linear(x, self.data, self.group, self.scale, self.minimum, bias, y)

    def _many(self, kernels, x, bias) -> torch.Tensor | None:
        """Blocks of channels dequantized into a cache-sized buffer, each through torch's
        matmul for every row at once; the last N % 16 channels dequantized in torch."""
        if x.shape[0] < self.many_rows:
            return None
        n, k = self.shape
        blocks = n // BLOCK
        step = max(1, BLOCK_BYTES // (4 * k * BLOCK))
        buf = torch.empty(k * BLOCK * min(step, max(blocks, 1)))
        y = torch.empty(x.shape[0], n)
        for b0 in range(0, blocks, step):
            b1 = min(blocks, b0 + step)
            part = buf[: k * BLOCK * (b1 - b0)].view(k, BLOCK * (b1 - b0))
            kernels.q4_dequant(self.data, self.group, self.scale, self.minimum, k, b0, b1, part)
            y[:, b0 * BLOCK : b1 * BLOCK] = x @ part
        if blocks * BLOCK < n:
            y[:, blocks * BLOCK :] = x @ self.dequantize()[blocks * BLOCK :].T
        return y + bias if bias is not None else y


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """Levels [N, K] -> qlinear.c's int4 layout, 1-D: per block of 16 channels and input k, 8
    bytes (byte j: channel j low, channel j + 8 high); then the last N % 16 channels, per 16
    inputs 8 bytes (byte j: input j low, input j + 8 high)."""
    n, k = q.shape
    full = n // BLOCK * BLOCK
    blocks = q[:full].reshape(full // BLOCK, BLOCK, k).transpose(1, 2)  # [B, K, 16]
    packed = blocks[..., :8] | (blocks[..., 8:] << 4)
    units = q[full:].reshape(n - full, k // 16, 2, 8)
    plain = units[:, :, 0] | (units[:, :, 1] << 4)
    return torch.cat([packed.reshape(-1), plain.reshape(-1)])


def _unpack4(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    full = n // BLOCK * BLOCK
    packed = data[: full * k // 2].view(full // BLOCK, k, 8)
    blocks = torch.cat([packed & 0x0F, packed >> 4], dim=2)  # [B, K, 16]
    plain = data[full * k // 2 :].view(n - full, k // 16, 1, 8)
    rows = torch.cat([plain & 0x0F, plain >> 4], dim=2).reshape(n - full, k)
    return torch.cat([blocks.transpose(1, 2).reshape(full, k), rows])


def int4_levels(w: torch.Tensor, group: int):
    """Asymmetric int4: over each group of inputs, scale = (max - min) / 15 and the minimum;
    returns the levels q in 0..15 (uint8 [N, K]), scales and minimums (float32 [N, groups])."""
    w = w.float()
    lo = torch.stack([g.amin(dim=1) for g in w.split(group, dim=1)], dim=1)
    hi = torch.stack([g.amax(dim=1) for g in w.split(group, dim=1)], dim=1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    expand = _per_input(w.shape[1], group, w.device)
    q = torch.round((w - lo[:, expand]) / safe[:, expand]).clamp_(0, 15).to(torch.uint8)
    return q, scale.contiguous(), lo.contiguous()


class TinygemmInt4:
    """int4 on CUDA through torch's tinygemm kernel (`_weight_int4pack_mm`, bf16 activations):
    on an H200 at 8B shapes, 1.5-2x bf16 `F.linear` at one row, slower from 16 rows on
    (bench/gpu_quant_probe.py). The same levels as Int4Weight; tinygemm keeps the scale and
    the zero (minimum + 8 * scale, for its q - 8) in bf16, so what this matrix means is its own
    `dequantize()`, read back through the kernel."""

    INNER_K_TILES = 8
    GROUPS = (32, 64, 128, 256)

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, group: int, shape):
        self.packed = packed
        self.scale_zero = scale_zero  # bf16 [groups, N, 2]
        self.group = group
        self.shape = tuple(shape)

    @classmethod
    def fits(cls, w: torch.Tensor, group: int) -> bool:
        n, k = w.shape
        return (
            w.is_cuda and group in cls.GROUPS and k % (cls.INNER_K_TILES * 16) == 0 and n % 8 == 0
        )

    @classmethod
    def quantize(cls, w: torch.Tensor, group: int) -> TinygemmInt4:
        q, scale, lo = int4_levels(w, group)
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()
        packed = torch._convert_weight_to_int4pack(pairs, cls.INNER_K_TILES)
        zero = lo + 8 * scale
        scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        return cls(packed, scale_zero.to(torch.bfloat16), group, w.shape)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zero.nbytes

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, self.shape[1]).to(torch.bfloat16)
        y = torch._weight_int4pack_mm(flat, self.packed, self.group, self.scale_zero)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y + bias if bias is not None else y

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        k = self.shape[1]
        eye = torch.eye(k, dtype=torch.bfloat16, device=self.packed.device)
        return torch._weight_int4pack_mm(eye, self.packed, self.group, self.scale_zero).T.to(dtype)


QuantWeight = Int8Weight | Int4Weight | TinygemmInt4


def _per_input(k: int, group: int, device: torch.device) -> torch.Tensor:
    """For each input index, its group."""
    return torch.arange(k, device=device) // group


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None):
    """F.linear for a float or a quantized weight matrix."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    return w.linear(x, bias)


def embedding(ids: torch.Tensor, w: torch.Tensor | QuantWeight, dtype: torch.dtype):
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    return w.embedding(ids, dtype)


def quantize_matrix(
    name: str, w: torch.Tensor, mode: str, group: int
) -> torch.Tensor | QuantWeight:
    """A layer's linear weight under `mode` (none, int8, int4)."""
    if mode == "none":
        return w
    if w.shape[1] % ALIGN:
        raise InvalidArgument(
            f"{name} has {w.shape[1]} inputs; --quantize needs a multiple of {ALIGN} "
            "(serve this model with --quantize none)"
        )
    if mode == "int8":
        return Int8Weight.quantize(w, group)
    if TinygemmInt4.fits(w, group):
        return TinygemmInt4.quantize(w, group)
    return Int4Weight.quantize(w, group)


def quantize_rows(name: str, w: torch.Tensor, mode: str) -> torch.Tensor | QuantWeight:
    """The embedding or head under `mode`: int8 with one scale per row for either setting."""
    return w if mode == "none" else quantize_matrix(name, w, "int8", 0)


def tensor_bytes(t: torch.Tensor | QuantWeight) -> int:
    return t.nbytes if not isinstance(t, torch.Tensor) else t.numel() * t.element_size()


def key(t: torch.Tensor | QuantWeight) -> int:
    """An identity for counting shared storage once."""
    return t.data_ptr() if isinstance(t, torch.Tensor) else id(t)
