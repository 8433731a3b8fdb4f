"""RoPE as transformers computes it: the inverse frequencies (default, linear, llama3; dynamic
equals the default up to the original context, protos/shared/model_family.py), cos and sin by
position in fixed chunks (`RopeTable`), and the rotation of q and k heads."""

from __future__ import annotations

import math

import torch

from protos.errors import InvalidArgument
from protos.shared.model_files import LlamaArgs


def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], computed as transformers does (float32)."""
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    kind = args.rope_scaling.get("rope_type", "default")
    if kind in ("default", "dynamic"):  # dynamic: the default up to the original context
        return inv_freq
    if kind == "linear":
        return inv_freq / args.rope_scaling["factor"]
    if kind == "llama3":
        p = args.rope_scaling
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p.get("original_max_position_embeddings", args.max_position_embeddings)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise InvalidArgument(f"rope_type {kind!r} is not supported (default, linear, llama3 are)")


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: [S] -> cos, sin: [S, 1, head_dim]
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


class RopeTable:
    """cos and sin of RoPE by position, computed in chunks of CHUNK positions when first asked
    for and kept: a position's values are the same whatever step asks for them (torch's
    elementwise cos on a CPU may round the tail of a tensor differently from its body, so
    computing them per step would tie them to the step's length)."""

    CHUNK = 1024

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq
        self.tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(
        self, positions: torch.Tensor, longest: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [S] (on the table's device), all below `longest` -> cos, sin [S, 1, D]."""
        cos, sin = self.tables.get(dtype, (None, None))
        have = 0 if cos is None else cos.shape[0]
        if have < longest:
            chunks = range(have, longest + self.CHUNK - 1, self.CHUNK)
            device = self.inv_freq.device
            parts = [
                rope_cos_sin(self.inv_freq, torch.arange(c, c + self.CHUNK, device=device), dtype)
                for c in chunks
            ]
            new_cos = torch.cat([p[0] for p in parts])
            new_sin = torch.cat([p[1] for p in parts])
            cos = new_cos if cos is None else torch.cat([cos, new_cos])
            sin = new_sin if sin is None else torch.cat([sin, new_sin])
            self.tables[dtype] = (cos, sin)
        return cos.index_select(0, positions), sin.index_select(0, positions)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [S, heads, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
