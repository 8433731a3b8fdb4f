"""Reads a model directory (config.json + *.safetensors): only the tensors of one layer range, by
name, so a stage never holds the whole model. Also the model fingerprint stages and the
orchestrator compare so that everyone serves the same weights."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from protos.errors import FailedPrecondition, InvalidArgument
from stage_service.model import LayerWeights, LlamaArgs, RangeWeights


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FailedPrecondition(
            f"{model_dir} has no config.json; pass --model DIR of an HF-layout model "
            "(`llamadist model fetch-default` makes one)"
        )
    return json.loads(path.read_text())


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FailedPrecondition(f"{model_dir} has no *.safetensors files")
    return files


def safetensors_header(path: Path) -> bytes:
    """The raw JSON header of a safetensors file (names, dtypes, shapes, offsets)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(length)


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every safetensors header: cheap, and changes with the
    architecture, tensor layout or file contents' sizes."""
    digest = hashlib.sha256(json.dumps(read_config(model_dir), sort_keys=True).encode())
    for path in safetensors_files(model_dir):
        digest.update(path.name.encode())
        digest.update(safetensors_header(path))
    return digest.hexdigest()[:16]


class TensorIndex:
    """Which safetensors file holds which tensor name."""

    def __init__(self, model_dir: Path):
        self.location: dict[str, Path] = {}
        for path in safetensors_files(model_dir):
            for name in json.loads(safetensors_header(path)):
                if name != "__metadata__":
                    self.location[name] = path

    def has(self, name: str) -> bool:
        return name in self.location

    def load(
        self, names: list[str], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.location:
                raise FailedPrecondition(f"tensor {name} is missing from the model's safetensors")
            by_file.setdefault(self.location[name], []).append(name)
        loaded: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in file_names:
                    loaded[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        return [loaded[n] for n in names]


def _load_layer(
    index: TensorIndex, i: int, args: LlamaArgs, dtype: torch.dtype, device: torch.device
) -> LayerWeights:
    p = f"model.layers.{i}."
    q, k, v, o, gate, up, down, n1, n2 = index.load(
        [
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
        ],
        dtype,
        device,
    )
    bqkv = bo = b_gate_up = b_down = None
    if args.attention_bias:
        bq, bk, bv, bo = index.load(
            [p + f"self_attn.{n}_proj.bias" for n in ("q", "k", "v", "o")], dtype, device
        )
        bqkv = torch.cat([bq, bk, bv])
    if args.mlp_bias:
        bg, bu, b_down = index.load(
            [p + f"mlp.{n}_proj.bias" for n in ("gate", "up", "down")], dtype, device
        )
        b_gate_up = torch.cat([bg, bu])
    return LayerWeights(
        input_norm=n1,
        wqkv=torch.cat([q, k, v]),
        bqkv=bqkv,
        wo=o,
        bo=bo,
        post_norm=n2,
        w_gate_up=torch.cat([gate, up]),
        b_gate_up=b_gate_up,
        w_down=down,
        b_down=b_down,
    )


def load_range(
    model_dir: Path, args: LlamaArgs, start: int, end: int, dtype: torch.dtype, device: torch.device
) -> RangeWeights:
    """Layers [start, end), plus embeddings when start == 0 and norm + head when end == L."""
    if not 0 <= start < end <= args.num_layers:
        raise InvalidArgument(
            f"layer range [{start}, {end}) is not inside the model's {args.num_layers} layers"
        )
    index = TensorIndex(model_dir)
    weights = RangeWeights(
        start=start,
        end=end,
        layers=[_load_layer(index, i, args, dtype, device) for i in range(start, end)],
    )
    if start == 0:
        (weights.embed,) = index.load(["model.embed_tokens.weight"], dtype, device)
    if end == args.num_layers:
        (weights.final_norm,) = index.load(["model.norm.weight"], dtype, device)
        if args.tie_word_embeddings or not index.has("lm_head.weight"):
            # Tied head: the embedding matrix, shared with `embed` when this stage has both.
            weights.head = (
                weights.embed
                if weights.embed is not None
                else index.load(["model.embed_tokens.weight"], dtype, device)[0]
            )
        else:
            (weights.head,) = index.load(["lm_head.weight"], dtype, device)
    return weights


def weight_bytes(weights: RangeWeights) -> int:
    seen: dict[int, int] = {}
    tensors = [weights.embed, weights.final_norm, weights.head]
    for layer in weights.layers:
        tensors.extend(vars(layer).values())
    for t in tensors:
        if t is not None:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())
