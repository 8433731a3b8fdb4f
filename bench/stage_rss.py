"""Resident memory of quantized CPU stages against the weights they hold (issue 12: RSS <= 1.15x
the quantized weights of the range plus its KV budget). Makes a random Llama model of about 1B
parameters (float32 safetensors, ~3.4 GB, in --dir), starts a 2-stage mesh of each --quantize
format on it, and prints each stage's RSS after the plan is loaded, its weight bytes (Info), and
their ratio. The CPU KV cache grows with sessions, so at rest it holds no KV bytes: the ratio is
RSS over weights alone (the target allows weights + budget).

Usage: PYTHONPATH=. python bench/stage_rss.py [--dir /tmp/llamadist-1b] [--quantize none,int8,int4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
    intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, torch_dtype="float32",
)  # fmt: skip


def make_model(path: Path) -> None:
    if (path / "config.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    c, g = CONFIG, torch.Generator().manual_seed(0)
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        save_file(
            {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(i, h),
                p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
            },
            str(path / f"layer-{layer:02d}.safetensors"),
        )
    save_file(
        {
            "model.embed_tokens.weight": rand(c["vocab_size"], h),
            "model.norm.weight": torch.ones(h),
            "lm_head.weight": rand(c["vocab_size"], h),
        },
        str(path / "ends.safetensors"),
    )
    (path / "config.json").write_text(json.dumps(c))


def main() -> None:
    from client.client import Client
    from client.launcher import LocalMesh

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "llamadist-1b"))
    p.add_argument("--quantize", default="none,int8,int4")
    a = p.parse_args()
    model = Path(a.dir)
    make_model(model)
    for fmt in a.quantize.split(","):
        with LocalMesh(str(model), num_stages=2, extra_stage_args=["--quantize", fmt]) as mesh:
            with Client(mesh.address, timeout_s=300) as client:
                client.wait_ready(300)
                infos = {s["address"]: s["info"] for s in client.stages()}
            stages = [proc for proc in mesh.processes if proc.name.startswith("stage")]
            for proc in stages:
                info = infos[proc.address]
                rss = psutil.Process(proc.proc.pid).memory_info().rss
                weights = int(info["weight_bytes"])
                print(
                    f"{fmt:5s} {proc.name}: RSS {rss / 2**20:7.0f} MiB, weights "
                    f"{weights / 2**20:7.0f} MiB ({info.get('quantize')}), RSS / weights "
                    f"{rss / weights:.2f}"
                )


if __name__ == "__main__":
    main()
