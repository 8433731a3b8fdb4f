"""The batch-invariant mode on a GPU: Triton kernels whose reduction order per output is fixed,
whatever the number of rows in the step, their order or their kind (prefill, decode, drafts).

cuBLAS picks its kernel (tile shapes, split-K) by the matrix shapes, so a row's sums change
with the number of rows beside it; torch's reductions split a row across blocks when there are
few rows. Here every kernel has one configuration, chosen by the model's dimensions only:
- `matmul`: tiles of BLOCK_M x BLOCK_N, the K dimension walked in BLOCK_K steps in order with a
  float32 accumulator, no split-K; a row's outputs do not depend on the other rows of its tile
  (the matrix instructions compute each output on its own).
- `rms_norm`: one program per row, the whole row in one block.
- `attention`: one program per (row, KV head) over the row's own positions 0..pos of its slot,
  in blocks of BLOCK_T with an online softmax: the same order for a prefill row as for the same
  token decoded alone, and graph-safe (the slot and position are read inside the kernel).
Elementwise ops (RoPE, SwiGLU, residual sums) stay in torch: on a GPU each element is computed
alone, the same way whatever the tensor's size.

This is the approach of vLLM's and SGLang's batch-invariant modes (fixed-tile Triton matmuls,
no split reductions); the kernels are our own, small enough to read. Ranges in this mode keep
their KV in static slots (the kernels address a row's cache by slot).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from protos.shared.model_files import LlamaArgs
from stage_service.model import LayerWeights
from stage_service.rope import apply_rope

# One configuration per kernel for every shape (changing it per shape would break invariance).
BLOCK_M, BLOCK_N, BLOCK_K = 64, 32, 128
BLOCK_T = 64  # attention: key positions per block


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is unused for 16-bit inputs


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # y[M, N] = x[M, K] @ w[N, K].T (+ bias), float32 accumulation over K in order
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(
            x_ptr + rm[:, None] * stride_x + kk[None, :],
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            w_ptr + rn[None, :] * stride_w + kk[:, None],
            mask=(rn[None, :] < N) & (kk[:, None] < K),
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_y + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for x [..., K], w [N, K]; each output's sum in a fixed order."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = flat.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M))
    _matmul_kernel[grid](
        flat, w, bias if bias is not None else w, y, m, n, k, flat.stride(0), w.stride(0),
        y.stride(0), HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, num_warps=4, num_stages=4,
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, H, eps, BLOCK: tl.constexpr):
    # as transformers' LlamaRMSNorm: normalised in float32, cast, scaled by the weight, cast
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    y = (x * r).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + offs, (w * y).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(flat)
    h = flat.shape[1]
    block = triton.next_power_of_2(h)
    _rms_norm_kernel[(flat.shape[0],)](flat, weight, y, h, eps, BLOCK=block, num_warps=8)
    return y.view(x.shape)


@triton.jit(do_not_specialize=["M"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slots_ptr, pos_ptr, M, G, D, scale,
    stride_qm, stride_qh, stride_ks, stride_kh, stride_kt, stride_om, stride_oh,
    PRECISION: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    # row m, KV head hk: its G query heads over positions 0..pos[m] of slot slots[m]
    m = tl.program_id(0)
    hk = tl.program_id(1)
    slot = tl.load(slots_ptr + m)
    pos = tl.load(pos_ptr + m)
    g = tl.arange(0, BG)
    d = tl.arange(0, BD)
    gmask, dmask = g < G, d < D
    q = tl.load(
        q_ptr + m * stride_qm + (hk * G + g)[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    k_base = k_ptr + slot * stride_ks + hk * stride_kh
    v_base = v_ptr + slot * stride_ks + hk * stride_kh
    top = tl.full((BG,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BG,), dtype=tl.float32)
    acc = tl.zeros((BG, BD), dtype=tl.float32)
    for t0 in range(0, pos + 1, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t <= pos
        k = tl.load(
            k_base + t[None, :] * stride_kt + d[:, None],
            mask=tmask[None, :] & dmask[:, None],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=PRECISION) * scale  # [BG, BT]
        s = tl.where(tmask[None, :], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))
        p = tl.exp(s - new_top[:, None])
        alpha = tl.exp(top - new_top)
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + t[:, None] * stride_kt + d[None, :],
            mask=tmask[:, None] & dmask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        top = new_top
    out = acc / total[:, None]
    tl.store(
        o_ptr + m * stride_om + (hk * G + g)[:, None] * stride_oh + d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=gmask[:, None] & dmask[None, :],
    )


def attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """q: [M, H, D]; pools: [slots, Hkv, context, D]; row m attends to positions
    0..positions[m] of slot slots[m] (its own K/V already written). Returns [M, H*D]."""
    rows, heads, dim = q.shape
    kv_heads = k_pool.shape[1]
    q = q.contiguous()
    out = torch.empty_like(q)
    grid = (rows, kv_heads)
    _attention_kernel[grid](
        q, k_pool, v_pool, out, slots, positions, rows, heads // kv_heads, dim,
        1.0 / math.sqrt(dim), q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        k_pool.stride(2), out.stride(0), out.stride(1), PRECISION=_precision(q.dtype),
        BG=max(16, triton.next_power_of_2(heads // kv_heads)),
        BD=max(16, triton.next_power_of_2(dim)), BT=BLOCK_T, num_warps=4,
    )  # fmt: skip
    return out.view(rows, heads * dim)


@triton.jit
def _logsumexp_kernel(x_ptr, out_ptr, V, stride, BLOCK: tl.constexpr):
    # one row: running max and sum over blocks of BLOCK in order
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    top = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(x_ptr + row * stride + v0 + offs, mask=v0 + offs < V, other=float("-inf"))
        new_top = tl.maximum(top, x)
        scale = tl.where(new_top == float("-inf"), 0.0, tl.exp(top - new_top))
        total = total * scale + tl.where(x == float("-inf"), 0.0, tl.exp(x - new_top))
        top = new_top
    best = tl.max(top, axis=0)
    lanes = tl.where(top == float("-inf"), 0.0, total * tl.exp(top - best))
    tl.store(out_ptr + row, best + tl.log(tl.sum(lanes, axis=0)))


def logsumexp_rows(rows: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(rows, -1) for float32 rows [n, vocab], one program per row."""
    rows = rows.float().contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    _logsumexp_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), BLOCK=1024)
    return out


def layer(
    args: LlamaArgs,
    w: LayerWeights,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """model.py's decoder layer with these kernels. x: [B, hidden], row b the token at
    positions[b] of slot slots[b] (device tensors: CUDA-graph safe)."""
    rows = x.shape[0]
    heads, kv_heads, dim = args.num_heads, args.num_kv_heads, args.head_dim
    h = rms_norm(x, w.input_norm, args.rms_norm_eps)
    qkv = matmul(h, w.wqkv, w.bqkv)
    qk, v = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
    qk = qk.reshape(rows, heads + kv_heads, dim)
    if w.q_norm is not None:  # Qwen3: one row per head, through the same per-row kernel
        q, k = qk.split([heads, kv_heads], dim=1)
        q = rms_norm(q.reshape(rows * heads, dim), w.q_norm, args.rms_norm_eps)
        k = rms_norm(k.reshape(rows * kv_heads, dim), w.k_norm, args.rms_norm_eps)
        qk = torch.cat([q.view(rows, heads, dim), k.view(rows, kv_heads, dim)], dim=1)
    qk = apply_rope(qk, cos, sin)
    q, k = qk.split([heads, kv_heads], dim=1)
    k_pool[slots, :, positions] = k
    v_pool[slots, :, positions] = v.view(rows, kv_heads, dim)
    attn = attention(q, k_pool, v_pool, slots, positions)
    x = x + matmul(attn, w.wo, w.bo)
    h = rms_norm(x, w.post_norm, args.rms_norm_eps)
    gate, up = matmul(h, w.w_gate_up, w.b_gate_up).chunk(2, dim=-1)
    return x + matmul(F.silu(gate) * up, w.w_down, w.b_down)


def head(x: torch.Tensor, norm: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The last stage's float32 logits of hidden rows x."""
    return matmul(rms_norm(x, norm, eps), w).float()
