"""Reads a model directory (config.json + *.safetensors): only the tensors of one layer range, by
name, so a stage never holds the whole model. What the files hold (config, tensor names, the
fingerprint) is read without torch by protos/shared/model_files.py; here the tensors are loaded.

Every tensor loaded is the stage's own memory, never a view of a file: safetensors and the
weights cache would otherwise hand out memory maps, through which a float32 stage (no dtype
conversion, no copy) serves whatever another process writes into the file later."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from protos.errors import FailedPrecondition, InvalidArgument, LlamadistError
from protos.shared.layer_range import LayerRange
from protos.shared.model_files import LlamaArgs, TensorIndex
from stage_service.model import LayerWeights, RangeWeights
from stage_service.quant import key, quantize_matrix, quantize_rows, tensor_bytes

# safetensors' dtype names, as the orchestrator's manifest gives them (weights over the wire)
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class Blob:
    """A tensor in the weights cache (stage_service/weight_cache.py): raw bytes named by their
    sha256."""

    sha256: str
    size: int
    dtype: str  # a SAFETENSORS_DTYPES key
    shape: tuple[int, ...]


# The weights cache's `read`: a blob's bytes in fresh memory, verified against its sha256.
ReadBlob = Callable[[str, int], bytearray]


class TensorSource:
    """Reads a range's tensors by name: from a model directory's safetensors (`index`), and the
    names in `blobs` from the weights cache (the tensors the orchestrator shipped) through
    `read_blob`."""

    def __init__(
        self,
        index: TensorIndex | None = None,
        blobs: dict[str, Blob] | None = None,
        read_blob: ReadBlob | None = None,
    ):
        self.index = index
        self.blobs = blobs or {}
        self.read_blob = read_blob

    @classmethod
    def of(cls, model_dir: Path) -> TensorSource:
        return cls(TensorIndex(model_dir))

    def has(self, name: str) -> bool:
        return name in self.blobs or (self.index is not None and self.index.has(name))

    def names(self) -> list[str]:
        local = list(self.index.shapes) if self.index is not None else []
        return sorted(set(local) | set(self.blobs))

    def load(
        self, names: list[str], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        """The named tensors, in order, each file opened once."""
        loaded: dict[str, torch.Tensor] = {}
        local = [n for n in names if n not in self.blobs]
        if local:
            if self.index is None:
                raise InvalidArgument(f"tensor {local[0]} is neither local nor shipped")
            for path, file_names in self.index.by_file(local).items():
                with safe_open(str(path), framework="pt") as f:
                    for name in file_names:
                        # get_tensor maps the file: copy=True makes it ours (see the docstring)
                        t = f.get_tensor(name)
                        loaded[name] = t.to(device=device, dtype=dtype, copy=True)
        for name in names:
            if name in self.blobs:
                loaded[name] = self._blob(name).to(device=device, dtype=dtype)
        return [loaded[n] for n in names]

    def _blob(self, name: str) -> torch.Tensor:
        """A cache tensor over the memory its bytes were verified in."""
        blob = self.blobs[name]
        try:
            data = self.read_blob(blob.sha256, blob.size)
        except LlamadistError as err:
            raise type(err)(f"tensor {name}: {err}") from None
        dtype = SAFETENSORS_DTYPES[blob.dtype]
        t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return t.view(blob.shape)


@dataclass(frozen=True)
class Quantization:
    mode: str = "none"  # none, int8, int4 (stage_service/quant.py)
    group: int = 32  # inputs per scale
    # The embedding and head as int8 rows (CPU). On CUDA they stay in the stage's dtype: no
    # kernel there reads int8 faster than bf16 (bench/gpu_quant_probe.py).
    rows_too: bool = True

    def matrix(self, name: str, w: torch.Tensor):
        return quantize_matrix(name, w, self.mode, self.group)

    def rows(self, name: str, w: torch.Tensor):
        return quantize_rows(name, w, self.mode if self.rows_too else "none")


NONE = Quantization()


def _load_layer(
    source: TensorSource,
    i: int,
    args: LlamaArgs,
    dtype: torch.dtype,
    device: torch.device,
    quant: Quantization,
) -> LayerWeights:
    p = f"model.layers.{i}."
    # Matrices to be quantized are read as float32: quantized from the checkpoint's own values.
    matrix_dtype = dtype if quant.mode == "none" else torch.float32
    q, k, v, o, gate, up, down = source.load(
        [
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
        ],
        matrix_dtype,
        device,
    )
    n1, n2 = source.load(
        [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"], dtype, device
    )
    bqkv = bo = b_gate_up = b_down = q_norm = k_norm = None
    if args.qkv_bias:
        bq, bk, bv = source.load(
            [p + f"self_attn.{n}_proj.bias" for n in ("q", "k", "v")], dtype, device
        )
        bqkv = torch.cat([bq, bk, bv])
    if args.o_bias:
        (bo,) = source.load([p + "self_attn.o_proj.bias"], dtype, device)
    if args.qk_norm:
        q_norm, k_norm = source.load(
            [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"], dtype, device
        )
    if args.mlp_bias:
        bg, bu, b_down = source.load(
            [p + f"mlp.{n}_proj.bias" for n in ("gate", "up", "down")], dtype, device
        )
        b_gate_up = torch.cat([bg, bu])
    hidden, qd, kvd, inter = (
        args.hidden_size,
        args.num_heads * args.head_dim,
        args.num_kv_heads * args.head_dim,
        args.intermediate_size,
    )
    expected = [
        ("q_proj.weight", q, (qd, hidden)), ("k_proj.weight", k, (kvd, hidden)),
        ("v_proj.weight", v, (kvd, hidden)), ("o_proj.weight", o, (hidden, qd)),
        ("gate_proj.weight", gate, (inter, hidden)), ("up_proj.weight", up, (inter, hidden)),
        ("down_proj.weight", down, (hidden, inter)), ("input_layernorm.weight", n1, (hidden,)),
        ("post_attention_layernorm.weight", n2, (hidden,)),
        ("q/k/v_proj.bias", bqkv, (qd + 2 * kvd,)), ("o_proj.bias", bo, (hidden,)),
        ("gate/up_proj.bias", b_gate_up, (2 * inter,)), ("down_proj.bias", b_down, (hidden,)),
        ("q_norm.weight", q_norm, (args.head_dim,)), ("k_norm.weight", k_norm, (args.head_dim,)),
    ]  # fmt: skip
    for name, tensor, shape in expected:
        check_shape(f"{p}{name}", tensor, shape)
    return LayerWeights(
        input_norm=n1,
        wqkv=quant.matrix(p + "self_attn.q/k/v_proj", torch.cat([q, k, v])),
        bqkv=bqkv,
        wo=quant.matrix(p + "self_attn.o_proj", o),
        bo=bo,
        post_norm=n2,
        w_gate_up=quant.matrix(p + "mlp.gate/up_proj", torch.cat([gate, up])),
        b_gate_up=b_gate_up,
        w_down=quant.matrix(p + "mlp.down_proj", down),
        b_down=b_down,
        q_norm=q_norm,
        k_norm=k_norm,
    )


def check_shape(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """A tensor has the shape config.json implies (a mismatch means another architecture)."""
    if tensor is not None and tuple(tensor.shape) != shape:
        raise FailedPrecondition(
            f"tensor {name} has shape {list(tensor.shape)}, config.json implies {list(shape)}: "
            "the checkpoint is not the architecture its config describes"
        )


def load_range(
    model: Path | TensorSource,
    args: LlamaArgs,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device,
    quant: Quantization = NONE,
) -> RangeWeights:
    """Layers [start, end), plus embeddings when start == 0 and norm + head when end == L; the
    matrices quantized as `quant` says, one layer at a time (never the whole range in float)."""
    if not 0 <= start < end <= args.num_layers:
        raise InvalidArgument(
            f"layer range [{start}, {end}) is not inside the model's {args.num_layers} layers"
        )
    source = model if isinstance(model, TensorSource) else TensorSource.of(model)
    weights = RangeWeights(
        span=LayerRange(start, end),
        layers=[_load_layer(source, i, args, dtype, device, quant) for i in range(start, end)],
    )
    rows_dtype = dtype if quant.mode == "none" or not quant.rows_too else torch.float32

    def rows(name: str):
        (w,) = source.load([name], rows_dtype, device)
        return quant.rows(name, w)

    if start == 0:
        weights.embed = rows("model.embed_tokens.weight")
        check_shape("model.embed_tokens.weight", weights.embed, (args.vocab_size, args.hidden_size))
    if end == args.num_layers:
        (weights.final_norm,) = source.load(["model.norm.weight"], dtype, device)
        if args.tie_word_embeddings:
            # Tied head: the embedding matrix, shared with `embed` when this stage has both.
            weights.head = (
                weights.embed if weights.embed is not None else rows("model.embed_tokens.weight")
            )
        elif source.has("lm_head.weight"):
            weights.head = rows("lm_head.weight")
        else:  # never the embedding in its place: another model's output
            raise FailedPrecondition(
                "config.json says tie_word_embeddings=false but the checkpoint has no "
                "lm_head.weight: give the whole checkpoint (or a config that ties the head)"
            )
        check_shape("lm_head.weight", weights.head, (args.vocab_size, args.hidden_size))
        check_shape("model.norm.weight", weights.final_norm, (args.hidden_size,))
    return weights


def weight_bytes(weights: RangeWeights) -> int:
    """Bytes held, quantized matrices at their packed size, shared storage counted once."""
    seen: dict[int, int] = {}
    tensors = [weights.embed, weights.final_norm, weights.head]
    for layer in weights.layers:
        tensors.extend(vars(layer).values())
    for t in tensors:
        if t is not None:
            seen[key(t)] = tensor_bytes(t)
    return sum(seen.values())
