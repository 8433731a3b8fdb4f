"""Our compact Llama math for one contiguous layer range.

RMSNorm, RoPE (default, linear and llama3 scaling), GQA attention over a per-session KV cache,
SwiGLU MLP, optional q/k/v, output and MLP biases, per-head q/k RMSNorm (Qwen3), tied or untied
head: the families of protos/shared/model_family.py. transformers' LlamaForCausalLM is
the reference: tests/test_model_parity.py compares logits on the same weights.

Shapes: a step is N rows, the tokens of one or more sessions (one `Segment` each); hidden states
are [N, hidden]; the KV cache of a layer is [n_kv_heads, capacity, head_dim] (see kv_cache.py).

Attention: on CPU plain matmuls with GQA grouping (no repeat of K/V), which measured faster than
torch's SDPA for single-token decode on the 2-core development machine; on CUDA one fused SDPA
kernel (fewer launches, fp32 accumulation as transformers' default SDPA path).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from protos.shared.layer_range import LayerRange
from protos.shared.model_files import LlamaArgs
from stage_service.quant import QuantWeight, embedding, linear
from stage_service.rope import RopeTable, apply_rope, rope_cos_sin, rope_inv_freq


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' LlamaRMSNorm: normalised in float32, cast back, then scaled. torch's
    rms_norm is one fused kernel on CUDA where the spelled-out formula launches six."""
    x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * x32.to(x.dtype)


@dataclass
class LayerWeights:
    """One decoder layer; q/k/v and gate/up are fused into one matrix each at load time. The
    matrices are float tensors, quantized (stage_service/quant.py) or packed for the CPU's C
    layers (stage_service/packed.py)."""

    input_norm: torch.Tensor
    wqkv: torch.Tensor | QuantWeight  # [(H + 2*Hkv) * D, hidden]
    bqkv: torch.Tensor | None
    wo: torch.Tensor | QuantWeight
    bo: torch.Tensor | None
    post_norm: torch.Tensor
    w_gate_up: torch.Tensor | QuantWeight  # [2 * intermediate, hidden]
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor | QuantWeight
    b_down: torch.Tensor | None
    q_norm: torch.Tensor | None = None  # [head_dim]: RMSNorm of each q head (Qwen3)
    k_norm: torch.Tensor | None = None  # [head_dim]: and of each k head, before RoPE


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, num_kv_heads: int
) -> torch.Tensor:
    """q: [S, H, D] at positions start_pos.. ; k, v: [Hkv, T, D] with T = start_pos + S.
    Returns [S, H*D]. Query head h reads KV head h // (H / Hkv), as transformers' repeat_kv."""
    seq, heads, dim = q.shape
    group = heads // num_kv_heads
    total = k.shape[1]
    assert total == start_pos + seq, (total, start_pos, seq)
    if q.is_cuda:  # one fused kernel (fp32 accumulation) instead of the matmuls below
        mask = None
        if seq > 1 and start_pos > 0:  # a replay onto a cut-back cache: causal with an offset
            mask = torch.ones(seq, total, dtype=torch.bool, device=q.device).tril(start_pos)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
            is_causal=seq > 1 and start_pos == 0, enable_gqa=True,
        )  # fmt: skip
        return out[0].transpose(0, 1).reshape(seq, heads * dim)
    qg = q.view(seq, num_kv_heads, group, dim).permute(1, 2, 0, 3)  # [Hkv, G, S, D]
    scores = torch.matmul(qg, k.unsqueeze(1).transpose(-1, -2)) / math.sqrt(dim)  # [Hkv,G,S,T]
    if seq > 1:
        query_pos = torch.arange(start_pos, total, device=q.device)[:, None]
        key_pos = torch.arange(total, device=q.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v.unsqueeze(1))  # [Hkv, G, S, D]
    return out.permute(2, 0, 1, 3).reshape(seq, heads * dim)


@dataclass
class Segment:
    """The rows of a step that belong to one session: x[rows] are its tokens at positions
    start_pos.., and kv holds its cache buffers, one (K, V) pair per held layer."""

    rows: slice
    start_pos: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    slot: int = -1  # static layout: the session's slot in the pool (kv are its views)


def qkv_rope(
    args: LlamaArgs, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's start: norm, the fused q/k/v projection, RoPE. Returns q [N, H, D] and
    k, v [N, Hkv, D]."""
    rows = x.shape[0]
    heads, kv_heads, dim = args.num_heads, args.num_kv_heads, args.head_dim
    h = rms_norm(x, w.input_norm, args.rms_norm_eps)
    qkv = linear(h, w.wqkv, w.bqkv)
    qk, v = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
    qk = qk.view(rows, heads + kv_heads, dim)
    if w.q_norm is not None:  # Qwen3: each head normalised on its own, q and k with their own
        q, k = qk.split([heads, kv_heads], dim=1)
        eps = args.rms_norm_eps
        qk = torch.cat([rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)], dim=1)
    qk = apply_rope(qk, cos, sin)  # q and k heads at once
    q, k = qk.split([heads, kv_heads], dim=1)
    return q, k, v.view(rows, kv_heads, dim)


def out_proj_mlp(
    args: LlamaArgs, w: LayerWeights, x: torch.Tensor, attn: torch.Tensor
) -> torch.Tensor:
    """A layer's end: the output projection onto the residual, then the SwiGLU MLP."""
    x = x + linear(attn, w.wo, w.bo)
    h = rms_norm(x, w.post_norm, args.rms_norm_eps)
    gate, up = linear(h, w.w_gate_up, w.b_gate_up).chunk(2, dim=-1)
    return x + linear(F.silu(gate) * up, w.w_down, w.b_down)


def decoder_layer(
    args: LlamaArgs,
    w: LayerWeights,
    layer: int,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    segments: list[Segment],
) -> torch.Tensor:
    """x: [N, hidden], the rows of every segment; matmuls run over all rows at once, attention
    per segment against its own cache (written in place)."""
    q, k, v = qkv_rope(args, w, x, cos, sin)
    k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, N, D]
    kv_heads = args.num_kv_heads
    outs = []
    for seg in segments:
        k_cache, v_cache = seg.kv[layer]
        end = seg.start_pos + seg.rows.stop - seg.rows.start
        k_cache[:, seg.start_pos : end] = k[:, seg.rows]
        v_cache[:, seg.start_pos : end] = v[:, seg.rows]
        outs.append(
            attention(q[seg.rows], k_cache[:, :end], v_cache[:, :end], seg.start_pos, kv_heads)
        )
    attn = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out_proj_mlp(args, w, x, attn)


class LayerParts(NamedTuple):
    """The pure ends of a decode layer (no cache writes), which `--compile` swaps for
    torch.compile'd versions that fuse their small kernels."""

    pre: Callable = qkv_rope
    post: Callable = out_proj_mlp


EAGER = LayerParts()


def decode_layer(
    args: LlamaArgs,
    w: LayerWeights,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor,
    parts: LayerParts = EAGER,
    dense: bool = False,
) -> torch.Tensor:
    """One decode token per row, with fixed shapes (CUDA-graph safe: no host values, no
    allocation that depends on data). x: [B, hidden]; row b is the token at positions[b] of the
    session in slot slots[b] of the pools ([slots, Hkv, context, D], kv_cache.SlotPool): its
    K/V are written there. key_mask: [B, 1, 1, L], True where a key position is past the row's
    own; attention reads the first L positions of each row's slot, gathered from the pool, or
    with `dense` straight from the pool's first B slots (row b is slot b, no copy)."""
    rows = x.shape[0]
    heads, kv_heads, dim = args.num_heads, args.num_kv_heads, args.head_dim
    q, k, v = parts.pre(args, w, x, cos, sin)
    k_pool[slots, :, positions] = k  # each row's new K/V at its position in its slot
    v_pool[slots, :, positions] = v
    context = key_mask.shape[-1]
    if dense:
        keys, values = k_pool[:rows, :, :context], v_pool[:rows, :, :context]  # [B, Hkv, L, D]
    else:
        keys = k_pool[:, :, :context].index_select(0, slots)
        values = v_pool[:, :, :context].index_select(0, slots)
    qg = q.view(rows, kv_heads, heads // kv_heads, dim)  # head h reads KV head h // group
    scores = torch.matmul(qg, keys.transpose(-1, -2)) / math.sqrt(dim)  # [B, Hkv, G, L]
    scores = scores.masked_fill(key_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    attn = torch.matmul(probs, values).reshape(rows, heads * dim)
    return parts.post(args, w, x, attn)


@dataclass
class RangeWeights:
    """Everything a stage holds for its span of layers: embeddings on the first stage, the
    final norm and head on the last."""

    span: LayerRange
    layers: list[LayerWeights]
    embed: torch.Tensor | QuantWeight | None = None  # [vocab, hidden]
    final_norm: torch.Tensor | None = None
    head: torch.Tensor | QuantWeight | None = None  # [vocab, hidden]; the embedding when tied

    @property
    def is_first(self) -> bool:
        return self.embed is not None

    @property
    def is_last(self) -> bool:
        return self.head is not None


class RangeModel:
    """Runs one step of one or more sessions through a layer range."""

    def __init__(
        self,
        args: LlamaArgs,
        weights: RangeWeights,
        device: torch.device,
        fused=None,
        gpu_invariant=None,
    ):
        """fused: the range as C calls (fused_layers.FusedLayers; its `range_model` builds
        both), for the steps it takes; None: torch only. gpu_invariant: the batch-invariant
        mode on a GPU: the module stage_service.invariant_gpu (its kernels; KV in static
        slots), else None."""
        self.args = args
        self.weights = weights
        self.device = device
        # Activations: the norms' dtype (a quantized embedding is dequantized to it).
        self.dtype = weights.layers[0].input_norm.dtype
        self.fused = fused
        self.gpu_invariant = gpu_invariant
        self.inv_freq = rope_inv_freq(args).to(device)
        self.rope = RopeTable(self.inv_freq)

    @torch.inference_mode()
    def run(
        self,
        segments: list[Segment],
        token_ids: torch.Tensor,
        hidden: torch.Tensor | None,
        all_logits: bool = False,
        tail_rows: list[int] | None = None,
        pool=None,
    ) -> torch.Tensor:
        """One step of one or more sessions. token_ids: [N], the rows of all segments in order;
        hidden: [N, hidden] (None on the first stage). Returns the hidden state [N, hidden], or on
        the last stage float32 logits: of every row, or of each segment's last tail_rows[i] rows
        (default one; a speculative step verifies several). pool: the kv_cache.SlotPool that
        the segments' slots are in (static layout; the GPU batch-invariant mode needs it)."""
        w = self.weights
        x = embedding(token_ids, w.embed, self.dtype) if w.is_first else hidden
        positions = torch.cat(
            [torch.arange(s.start_pos, s.start_pos + s.rows.stop - s.rows.start) for s in segments]
        ).to(self.device)
        longest = max(s.start_pos + s.rows.stop - s.rows.start for s in segments)
        cos, sin = self.rope.lookup(positions, longest, x.dtype)
        fused = self.fused is not None and self.fused.takes(segments, x.shape[0])
        if fused:
            x = self.fused.run(x, cos, sin, segments).to(self.dtype)  # one C call per layer
        elif self.gpu_invariant is not None:
            assert pool is not None and all(s.slot >= 0 for s in segments), "needs static slots"
            slots = torch.tensor(
                [s.slot for s in segments for _ in range(s.rows.stop - s.rows.start)],
                device=self.device,
            )  # checked on the host: no wait for the GPU
            for i, layer in enumerate(w.layers):
                x = self.gpu_invariant.layer(
                    self.args, layer, x, cos, sin, pool.k[i], pool.v[i], slots, positions
                )
        else:
            for i, layer in enumerate(w.layers):
                x = decoder_layer(self.args, layer, i, x, cos, sin, segments)
        if not w.is_last:
            return x
        if not all_logits:
            tails = tail_rows or [1] * len(segments)
            x = x[
                [
                    r
                    for s, t in zip(segments, tails, strict=True)
                    for r in range(s.rows.stop - t, s.rows.stop)
                ]
            ]
        if fused and self.fused.every_step:  # batch-invariant: the head's rows in C too
            return self.fused.logits(x)
        return self._head(x)

    @torch.inference_mode()
    def decode(
        self,
        pool,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        context: int,
        parts: LayerParts = EAGER,
        dense: bool = False,
    ) -> torch.Tensor:
        """One decode token per row over a kv_cache.SlotPool, with fixed shapes (see
        decode_layer). inputs: token ids [B] on the first stage, else hidden states [B, hidden];
        attention reads the first `context` positions of each slot. Returns as `run`."""
        w = self.weights
        x = embedding(inputs, w.embed, self.dtype) if w.is_first else inputs
        if (
            self.gpu_invariant is not None
        ):  # as `run` computes them: RoPE from the table, these kernels
            cos, sin = self.rope.lookup(positions, pool.k[0].shape[2], x.dtype)
            for i, layer in enumerate(w.layers):
                x = self.gpu_invariant.layer(
                    self.args, layer, x, cos, sin, pool.k[i], pool.v[i], slots, positions
                )
            return self._head(x) if w.is_last else x
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        key_pos = torch.arange(context, device=self.device)
        key_mask = (key_pos[None, :] > positions[:, None])[:, None, None, :]
        for i, layer in enumerate(w.layers):
            x = decode_layer(
                self.args, layer, pool.k[i], pool.v[i], x, cos, sin, slots, positions, key_mask,
                parts, dense,
            )  # fmt: skip
        return self._head(x) if w.is_last else x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.gpu_invariant is not None:
            return self.gpu_invariant.head(
                x, self.weights.final_norm, self.weights.head, self.args.rms_norm_eps
            )
        x = rms_norm(x, self.weights.final_norm, self.args.rms_norm_eps)
        return linear(x, self.weights.head).float()
