"""The GPU benchmarks' model: Llama-3-8B-shaped (hidden 4096, 32 layers, 32/8 heads, FFN 14336,
vocab 128256) with random bf16 weights, made on cuda:0 and saved as sharded safetensors, and the
prompt they send (throughput does not depend on weight values)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "torch_dtype": "bfloat16",
}
PROMPT = [(i * 7919) % 128000 + 1 for i in range(32)]


def make_model(path: Path) -> None:
    from safetensors.torch import save_file

    if (path / "config.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    c = CONFIG
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    g = torch.Generator(device="cuda:0").manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device="cuda:0") * std).to(torch.bfloat16).cpu()

    weight_map: dict[str, str] = {}

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, str(path / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard = {"model.embed_tokens.weight": rand(c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shard |= {
            p + "self_attn.q_proj.weight": rand(q, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
        if n % 8 == 7:
            save(shard, f"model-{n // 8:02d}.safetensors")
            shard = {}
    shard |= {
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": rand(c["vocab_size"], h),
    }
    save(shard, "model-99.safetensors")
    index = {"metadata": {}, "weight_map": weight_map}  # transformers finds shards by it
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(CONFIG))
