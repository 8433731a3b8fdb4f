"""What the planner knows about the model and the stages, as plain numbers.

`ModelProfile` is built from config.json and the safetensors *headers* only (names, dtypes,
shapes): no weight is ever loaded. Bytes are at the serving dtype (`dtype_bytes` per element),
whatever dtype the files hold. FLOPs count multiply-adds as 2: the matmul weights of a layer cost
2 * params per token, attention over c cached tokens costs 4 * heads * head_dim * c (scores and
the weighted sum of values). Norms, activations, RoPE and biases are left out (small next to the
matmuls).

This module imports no torch and no gRPC (protos/model_files reads the files without either),
so the planning layer stays importable anywhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from protos.errors import FailedPrecondition, InvalidArgument
from protos.shared.layer_range import LayerRange
from protos.shared.model_files import LlamaArgs, TensorIndex, read_config

_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class ModelProfile:
    num_layers: int
    layer_bytes: tuple[int, ...]  # weight bytes of each decoder layer, at the serving dtype
    embed_bytes: int  # embedding matrix
    norm_bytes: int  # final norm
    # lm_head; equal to embed_bytes when tied (the last stage holds a copy unless it is also
    # the first)
    head_bytes: int
    tied: bool
    # FLOPs per generated token per layer: 2 * params of the matmuls + attention over `context`
    layer_flops_decode: tuple[float, ...]
    # FLOPs per prompt token per layer: same matmuls, attention at half the context on average
    layer_flops_prefill: tuple[float, ...]
    head_flops: float  # 2 * vocab * hidden per token
    kv_bytes_per_token_per_layer: int  # 2 * kv_heads * head_dim * dtype bytes

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise InvalidArgument(f"a model needs at least one layer, got {self.num_layers}")
        for name in ("layer_bytes", "layer_flops_decode", "layer_flops_prefill"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if len(value) != self.num_layers:
                raise InvalidArgument(
                    f"{name} has {len(value)} entries but the model has {self.num_layers} layers"
                )
        negative = [
            name
            for name in ("embed_bytes", "norm_bytes", "head_bytes", "head_flops")
            if getattr(self, name) < 0
        ]
        if negative or min(self.layer_bytes) < 0 or min(self.layer_flops_decode) < 0:
            raise InvalidArgument(f"model profile has negative sizes: {negative or 'layers'}")

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        dtype_bytes: int = 4,
        context: int = 1024,
        weight_format: str = "none",
    ) -> ModelProfile:
        """From config.json + the safetensors headers (never loads a weight). Layer bytes are
        the element counts of the layer's tensors times `dtype_bytes`, the matrices (and the
        embedding and head) at their packed size under a quantized `weight_format` (a stage's
        --quantize as its Info reports it: none, int8, int4-g<group>); attention FLOPs assume
        `context` cached tokens per generated token."""
        if dtype_bytes < 1:
            raise InvalidArgument(f"dtype_bytes must be >= 1, got {dtype_bytes}")
        if context < 0:
            raise InvalidArgument(f"context must be >= 0 tokens, got {context}")
        model_dir = Path(model_dir)
        args = LlamaArgs.from_config(read_config(model_dir))
        shapes = TensorIndex(model_dir).shapes
        numel = {name: math.prod(shape) for name, shape in shapes.items()}

        packed = packed_bytes(weight_format)
        layer_bytes = [0] * args.num_layers
        matmul_params = [0] * args.num_layers
        for name, count in numel.items():
            m = _LAYER_TENSOR.match(name)
            if m is None or int(m.group(1)) >= args.num_layers:
                continue
            i = int(m.group(1))
            if len(shapes[name]) == 2:  # the projection matrices (norms and biases are 1-D)
                matmul_params[i] += count
                layer_bytes[i] += packed(shapes[name], False) or count * dtype_bytes
            else:
                layer_bytes[i] += count * dtype_bytes
        missing = [i for i, n in enumerate(layer_bytes) if n == 0]
        if missing:
            raise FailedPrecondition(
                f"{model_dir}: config.json says {args.num_layers} layers but the safetensors "
                f"files hold no tensors for layer(s) {', '.join(map(str, missing))}"
            )
        for name in (EMBED, NORM):
            if name not in numel:
                raise FailedPrecondition(f"{model_dir}: tensor {name} is missing")

        # As stage_service.weights.load_range: tied when config.json says so, and an untied
        # checkpoint without its head is refused, never served with the embedding in its place.
        tied = bool(args.tie_word_embeddings)
        if not tied and HEAD not in numel:
            raise FailedPrecondition(
                f"{model_dir}: config.json says tie_word_embeddings=false but the checkpoint "
                f"has no {HEAD}"
            )
        embed_bytes = packed(shapes[EMBED], True) or numel[EMBED] * dtype_bytes
        attention = 4.0 * args.num_heads * args.head_dim
        return cls(
            num_layers=args.num_layers,
            layer_bytes=tuple(layer_bytes),
            embed_bytes=embed_bytes,
            norm_bytes=numel[NORM] * dtype_bytes,
            head_bytes=embed_bytes
            if tied
            else packed(shapes[HEAD], True) or numel[HEAD] * dtype_bytes,
            tied=tied,
            layer_flops_decode=tuple(2.0 * p + attention * context for p in matmul_params),
            layer_flops_prefill=tuple(2.0 * p + attention * context / 2 for p in matmul_params),
            head_flops=2.0 * args.vocab_size * args.hidden_size,
            kv_bytes_per_token_per_layer=2 * args.num_kv_heads * args.head_dim * dtype_bytes,
        )

    def fixed_bytes(self, first: bool, last: bool) -> int:
        """The weights a stage holds besides its layers: embeddings on the first stage, final
        norm and head on the last (a tied head is the embedding matrix itself when one stage is
        both first and last, otherwise the last stage holds its own copy)."""
        total = self.embed_bytes if first else 0
        if last:
            total += self.norm_bytes
            if not (self.tied and first):
                total += self.head_bytes
        return total

    def stage_weight_bytes(self, r: LayerRange, first: bool, last: bool) -> int:
        return sum(self.layer_bytes[r.start : r.end]) + self.fixed_bytes(first, last)

    def stage_flops(self, r: LayerRange, first: bool, last: bool) -> float:
        """Decode FLOPs per token of a stage: its layers, plus the head on the last stage (the
        embedding is a lookup: no FLOPs)."""
        return sum(self.layer_flops_decode[r.start : r.end]) + (self.head_flops if last else 0.0)

    @property
    def total_weight_bytes(self) -> int:
        """The whole model held once (a tied head counted once)."""
        return self.stage_weight_bytes(LayerRange(0, self.num_layers), True, True)


def packed_bytes(weight_format: str):
    """fn(shape, is_embedding_or_head) -> bytes of that matrix under a stage's weight format
    (as stage_service/quant.py stores it), or 0 where the format leaves it at the dtype.
    int8-g<G>: a byte a weight and a float32 scale per G inputs of a row; int4-g<G>: half a
    byte a weight and two float32 (scale, minimum) per G inputs; the embedding and head are int8
    with one scale a row under both, unless the format ends in -float-head (a GPU stage): then
    they stay at the dtype."""
    if weight_format in ("", "none"):
        return lambda shape, rows: 0
    float_head = weight_format.endswith("-float-head")
    kind, _, group_text = weight_format.removesuffix("-float-head").partition("-g")
    if kind not in ("int8", "int4") or not group_text.isdigit() or int(group_text) < 1:
        raise InvalidArgument(
            f"unknown weight format {weight_format!r} (none, or int8-g<G> or int4-g<G>, "
            "optionally ending in -float-head)"
        )
    group = int(group_text)

    def size(shape: tuple[int, ...], rows: bool) -> int:
        n, k = shape
        if rows:
            return 0 if float_head else n * k + 4 * n
        if kind == "int8":
            return n * k + 4 * n * -(-k // group)
        return n * k // 2 + 8 * n * -(-k // group)

    return size


@dataclass(frozen=True)
class StageCapacity:
    address: str
    device: str
    memory_bytes: int  # what the stage can devote to weights + KV cache
    kv_budget_bytes: int  # the stage's KV cache budget (counted against the memory limit)
    gflops: float  # measured speed, GFLOP/s (> 0)

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or self.kv_budget_bytes < 0:
            raise InvalidArgument(
                f"stage {self.address}: memory ({self.memory_bytes}) and KV budget "
                f"({self.kv_budget_bytes}) must be >= 0 bytes"
            )
        if not (self.gflops > 0 and math.isfinite(self.gflops)):
            raise InvalidArgument(
                f"stage {self.address}: speed must be a positive number of GFLOP/s, "
                f"got {self.gflops}"
            )
