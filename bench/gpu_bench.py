"""GPU benchmark (issue 6), run on a lent 2-GPU machine by bench/gpu.sh.

Makes a Llama-3-8B-shaped model with random bf16 weights as safetensors (throughput does not
depend on weight values), serves it as two stages (one per GPU) behind an orchestrator on
loopback, measures batch-1 decode and aggregate tok/s at several concurrencies, checks greedy
parity against transformers on the same weights, then measures transformers' eager generate on
one GPU as the baseline. Prints a table last and writes gpu_bench.json to $OUT.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
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


def mesh_numbers(model: Path, log_dir: Path, results: dict) -> list[int]:
    from client.bench import aggregate
    from client.client import Client
    from client.launcher import Process

    procs = []
    try:
        stages = []
        for gpu in (0, 1):
            args = [
                "stage",
                "--model",
                str(model),
                "--port",
                "0",
                "--device",
                f"cuda:{gpu}",
                "--dtype",
                "bfloat16",
                "--kv-cache-mb",
                "16000",
                "--max-context",
                "1024",
                "--compile",
                "--threads",
                "4",
            ]
            procs.append(Process(f"stage{gpu}", args, log_dir))
            stages.append(procs[-1].wait_address(600))
        procs.append(
            Process(
                "orchestrator",
                [
                    "orchestrator",
                    "--model",
                    str(model),
                    "--port",
                    "0",
                    "--stages",
                    ",".join(stages),
                    "--max-sessions-per-client",
                    "256",
                ],
                log_dir,
            )
        )
        address = procs[-1].wait_address(120)
        with Client(address, timeout_s=600) as client:
            client.wait_ready(600)
            client.generate(token_ids=PROMPT, max_new_tokens=16, ignore_eos=True)  # warm-up
            runs = [
                client.generate(token_ids=PROMPT, max_new_tokens=128, ignore_eos=True)
                for _ in range(3)
            ]
            t = [r.timings for r in runs]
            results["mesh_batch1_decode_tok_s"] = statistics.median(
                x["decode_tokens_per_s"] for x in t
            )
            results["mesh_ttft_ms"] = statistics.median(x["ttft_ms"] for x in t)
            results["mesh_hop_overhead_ms"] = statistics.median(x["hop_overhead_ms"] for x in t)
            results["mesh_stage_ms_per_token"] = [
                statistics.median(x["stages"][i]["compute_ms"] / x["stages"][i]["steps"] for x in t)
                for i in (0, 1)
            ]
            greedy = runs[0].token_ids[:16]
        results["mesh_aggregate_tok_s"] = {
            n: aggregate(lambda: Client(address, timeout_s=600), n, 128, token_ids=PROMPT)
            for n in (1, 4, 16, 64)
        }
        return greedy
    finally:
        for p in procs:
            p.stop()


def in_process_numbers(model: Path, results: dict) -> None:
    """The whole model as one range on cuda:0, no gRPC: decode step time through the static
    decoder (CUDA graphs) at 1 and 64 rows, and logits for the parity check: every prompt
    position from the general path, the last 8 from decode steps (the graphs)."""
    from protos.model_files import LlamaArgs, read_config
    from stage_service.decode import StaticDecoder
    from stage_service.kv_cache import CacheShape, SessionCache
    from stage_service.model import RangeModel, Segment
    from stage_service.weights import load_range

    dev = torch.device("cuda:0")
    args = LlamaArgs.from_config(read_config(model))
    ours = RangeModel(args, load_range(model, args, 0, args.num_layers, torch.bfloat16, dev), dev)
    shape = CacheShape(args.num_layers, args.num_kv_heads, args.head_dim, torch.bfloat16, dev, 256)
    cache = SessionCache(shape, 65 * 256 * shape.bytes_per_token, 600, static=True)
    decoder = StaticDecoder(ours, cache.pool, 64, graphs=True)
    ids = torch.tensor(PROMPT, device=dev)
    n = len(PROMPT)
    session = cache.begin_step("all", 0, n)
    eager = ours.forward([Segment(slice(0, n), 0, session.kv)], ids, None, all_logits=True)
    session = cache.begin_step("decode", 0, n - 8)
    ours.forward([Segment(slice(0, n - 8), 0, session.kv)], ids[: n - 8], None)
    decoded = [
        decoder.run([session.slot], [pos], [PROMPT[pos]], None).clone() for pos in range(n - 8, n)
    ]
    results["_ours_logits"] = (eager.cpu(), torch.cat(decoded).cpu())
    cache.end("all")
    cache.end("decode")
    for rows in (1, 64):
        slots = [cache.begin_step(f"t{i}", 0, 1).slot for i in range(rows)]
        times = []
        for pos in range(100, 140):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            decoder.run(slots, [pos] * rows, [7] * rows, None).argmax(-1).tolist()
            times.append(time.perf_counter() - t0)
        results[f"inproc_32_layers_decode_ms_batch{rows}"] = statistics.median(times[5:]) * 1e3
        for i in range(rows):
            cache.end(f"t{i}")
    results["inproc_graphs_captured"] = decoder.captured


def parity(model: Path, results: dict) -> None:
    """||x - ref|| / ||ref|| over the logits, with transformers in float32 as ref: ours (bf16,
    general path and decode graphs) and transformers' own bf16, so the bf16 band is measured
    rather than assumed."""
    from transformers import LlamaForCausalLM

    eager, decoded = results.pop("_ours_logits")
    ids = torch.tensor([PROMPT], device="cuda:1")
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        ref = LlamaForCausalLM.from_pretrained(str(model), dtype=dtype).to("cuda:1").eval()
        with torch.inference_mode():
            logits[dtype] = ref(ids).logits[0].float().cpu()
        del ref
        torch.cuda.empty_cache()
    fp32, bf16 = logits[torch.float32], logits[torch.bfloat16]

    def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float((x - ref).norm() / ref.norm())

    results["logits_rel_error_ours_vs_fp32"] = rel(eager, fp32)
    results["logits_rel_error_ours_decode_graphs_vs_fp32"] = rel(decoded, fp32[-8:])
    results["logits_rel_error_transformers_bf16_vs_fp32"] = rel(bf16, fp32)
    results["logits_rel_error_ours_vs_transformers_bf16"] = rel(eager, bf16)


def transformers_numbers(model: Path, results: dict, ours: list[int]) -> None:
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(str(model), dtype=torch.bfloat16).to("cuda:0").eval()
    cfg = ref.generation_config
    cfg.eos_token_id, cfg.pad_token_id, cfg.do_sample = None, 0, False
    with torch.inference_mode():
        ids = torch.tensor([PROMPT], device="cuda:0")
        theirs = ref.generate(ids, generation_config=cfg, max_new_tokens=16)[
            0, len(PROMPT) :
        ].tolist()
        results["greedy_match_of_16"] = sum(a == b for a, b in zip(ours, theirs, strict=False))
        results["greedy_prefix_match"] = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), 16
        )
        for batch in (1, 64):
            x = ids.repeat(batch, 1)
            ref.generate(x, generation_config=cfg, max_new_tokens=8)
            torch.cuda.synchronize()
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                out = ref.generate(x, generation_config=cfg, max_new_tokens=128)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            results[f"transformers_eager_batch{batch}_tok_s"] = (
                batch * (out.shape[1] - len(PROMPT)) / statistics.median(times)
            )


def main() -> int:
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    model = Path("/tmp/llama3-8b-random")
    results: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    t0 = time.perf_counter()
    make_model(model)
    results["make_model_s"] = time.perf_counter() - t0
    ours = mesh_numbers(model, out, results)
    in_process_numbers(model, results)
    torch.cuda.empty_cache()
    parity(model, results)
    transformers_numbers(model, results, ours)
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=2))
    for k, v in results.items():
        print(f"{k:36s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
