"""Reads a model directory (config.json + *.safetensors): only the tensors of one layer range, by
name, so a stage never holds the whole model. What the files hold (config, tensor names, the
fingerprint) is read without torch by protos/model_files.py; here the tensors are loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from protos.errors import InvalidArgument
from protos.model_files import LlamaArgs, TensorIndex
from stage_service.model import LayerWeights, RangeWeights


def load_tensors(
    index: TensorIndex, names: list[str], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """The named tensors, in order, each file opened once."""
    loaded: dict[str, torch.Tensor] = {}
    for path, file_names in index.by_file(names).items():
        with safe_open(str(path), framework="pt") as f:
            for name in file_names:
                loaded[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return [loaded[n] for n in names]


def _load_layer(
    index: TensorIndex, i: int, args: LlamaArgs, dtype: torch.dtype, device: torch.device
) -> LayerWeights:
    p = f"model.layers.{i}."
    q, k, v, o, gate, up, down, n1, n2 = load_tensors(
        index,
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
        bq, bk, bv, bo = load_tensors(
            index, [p + f"self_attn.{n}_proj.bias" for n in ("q", "k", "v", "o")], dtype, device
        )
        bqkv = torch.cat([bq, bk, bv])
    if args.mlp_bias:
        bg, bu, b_down = load_tensors(
            index, [p + f"mlp.{n}_proj.bias" for n in ("gate", "up", "down")], dtype, device
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
        (weights.embed,) = load_tensors(index, ["model.embed_tokens.weight"], dtype, device)
    if end == args.num_layers:
        (weights.final_norm,) = load_tensors(index, ["model.norm.weight"], dtype, device)
        if args.tie_word_embeddings or not index.has("lm_head.weight"):
            # Tied head: the embedding matrix, shared with `embed` when this stage has both.
            weights.head = (
                weights.embed
                if weights.embed is not None
                else load_tensors(index, ["model.embed_tokens.weight"], dtype, device)[0]
            )
        else:
            (weights.head,) = load_tensors(index, ["lm_head.weight"], dtype, device)
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
