"""GPU benchmark (issues 6 and 11), run on a lent machine with one or two GPUs by bench/gpu.sh.

Makes a Llama-3-8B-shaped model with random bf16 weights as safetensors (throughput does not
depend on weight values), serves it as two stages behind an orchestrator on loopback (stage i on
cuda:{i % GPUs}: one per GPU on two, both on one), measures batch-1 decode and aggregate tok/s at
several concurrencies; then batch 1 on meshes of 3 and 4 stages (--stage-counts) for the mesh
overhead per token at each stage count (decode wall per token minus the stages' compute per
token; `timings.mesh_overhead_ms` where the orchestrator reports it, see bench/mesh.py); checks
logits and greedy parity against transformers on the same weights, then measures transformers'
eager generate on one GPU as the baseline. Prints a table last and writes gpu_bench.json to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_model import PROMPT, make_model  # noqa: E402


def device_of(i: int) -> str:
    """Stage i's GPU: one stage per GPU on two, all on one GPU when there is one."""
    return f"cuda:{i % torch.cuda.device_count()}"


def start_mesh(
    model: Path,
    log_dir: Path,
    stages: int,
    kv_cache_mb: int,
    procs: list,
    quantize: str = "none",
    ready_s: float = 600,
    extra: tuple[str, ...] = (),
) -> str:
    """`stages` stage processes (stage i on device_of(i)) and an orchestrator; appends them to
    `procs` (the caller stops them) and returns the orchestrator's address once it serves."""
    from client.client import Client
    from client.launcher import Process
    from protos.shared.stage_auth import key_env

    os.environ.update(key_env(log_dir))  # the stage processes and the orchestrator share a key
    addresses = []
    for i in range(stages):
        args = [
            "stage",
            "--model",
            str(model),
            "--port",
            "0",
            "--device",
            device_of(i),
            "--dtype",
            "bfloat16",
            "--kv-cache-mb",
            str(kv_cache_mb),
            "--max-context",
            "1024",
            *(["--compile"] if "--no-compile" not in extra else []),
            "--threads",
            "4",
            *(["--quantize", quantize, "--allow-slow-dtype"] if quantize != "none" else []),
            *(a for a in extra if a != "--no-compile"),
        ]
        procs.append(Process(f"stage{i}-of-{stages}", args, log_dir))
        addresses.append(procs[-1].wait_address(600))
    args = ["orchestrator", "--model", str(model), "--port", "0", "--stages", ",".join(addresses)]
    procs.append(
        Process(f"orchestrator-{stages}", [*args, "--max-sessions-per-client", "256"], log_dir)
    )
    address = procs[-1].wait_address(120)
    with Client(address, timeout_s=600) as client:
        client.wait_ready(ready_s)
    return address


def stop(procs: list) -> None:
    for p in reversed(procs):
        p.stop()
    procs.clear()


def overhead_entry(b: dict) -> dict:
    """The mesh-overhead numbers of a batch-1 measurement (bench.mesh.batch1), per token."""
    keys = (
        "decode_tokens_per_s",
        "stage_compute_ms_per_token",
        "overhead_ms_per_token",
        "overhead_ms_per_token_computed",
        "overhead_ms_per_step",
        "overhead_from_timings",
    )
    return {k: b[k] for k in keys} | {"devices": [device_of(i) for i in range(b["stages"])]}


def mesh_numbers(model: Path, log_dir: Path, results: dict, stage_counts: list[int]) -> list[int]:
    """The 2-stage mesh: batch 1 (128 tokens, 3 runs), greedy tokens for the parity check, and
    aggregate tok/s at 1-64 sessions; then batch 1 only on a mesh of each other stage count, for
    the mesh overhead per token (decode wall per token minus the stages' compute per token)."""
    from bench.mesh import aggregate, batch1, median_per_stage
    from client.client import Client

    procs: list = []
    overhead = {}
    try:
        address = start_mesh(model, log_dir, 2, 16000, procs)
        with Client(address, timeout_s=600) as client:
            client.generate(token_ids=PROMPT, max_new_tokens=16, ignore_eos=True)  # warm-up
            greedy = client.generate(token_ids=PROMPT, max_new_tokens=16, ignore_eos=True).token_ids
            b = batch1(client, 128, 3, token_ids=PROMPT)
        results["mesh_batch1_decode_tok_s"] = b["decode_tokens_per_s"]
        results["mesh_ttft_ms"] = b["ttft_ms"]
        results["mesh_hop_overhead_ms"] = b["hop_overhead_ms"]
        results["mesh_stage_ms_per_token"] = b["stage_compute_ms_per_token"]
        overhead[2] = overhead_entry(b)
        batches: dict[int, list] = {n: [] for n in (1, 4, 16, 64)}
        step_ms: dict[int, list] = {n: [] for n in batches}
        results["mesh_aggregate_tok_s"] = {
            n: aggregate(
                lambda: Client(address, timeout_s=600),
                n,
                128,
                batches[n],
                step_ms[n],
                token_ids=PROMPT,
            )
            for n in batches
        }
        # each stage's compute per step: the cohort step's time is theirs plus the mesh's
        results["mesh_aggregate_stage_ms_per_step"] = {
            n: median_per_stage(runs) for n, runs in step_ms.items()
        }
        # each stage's batch, to tell a slow forward from fragmented batches
        results["mesh_aggregate_mean_batch_per_stage"] = {
            n: median_per_stage(runs) for n, runs in batches.items()
        }
        stop(procs)
        for n in stage_counts:
            if n == 2:
                continue
            # batch 1 needs one slot: a small KV budget keeps 4 stages on one GPU cheap
            address = start_mesh(model, log_dir, n, 2000, procs)
            with Client(address, timeout_s=600) as client:
                client.generate(token_ids=PROMPT, max_new_tokens=16, ignore_eos=True)  # warm-up
                overhead[n] = overhead_entry(batch1(client, 128, 3, token_ids=PROMPT))
            stop(procs)
        results["mesh_overhead"] = {str(n): overhead[n] for n in sorted(overhead)}
        return greedy
    finally:
        stop(procs)


def format_numbers(model: Path, log_dir: Path, results: dict, fmt: str) -> None:
    """A 2-stage mesh whose stages hold `fmt` weights (--quantize): batch 1 and aggregate tok/s
    at 1, 16 and 64 sessions, into results["weight_formats"][fmt]."""
    from bench.mesh import aggregate, batch1
    from client.client import Client

    procs: list = []
    try:
        address = start_mesh(model, log_dir, 2, 16000, procs, fmt, ready_s=240)
        with Client(address, timeout_s=600) as client:
            client.generate(token_ids=PROMPT, max_new_tokens=16, ignore_eos=True)  # warm-up
            b = batch1(client, 128, 3, token_ids=PROMPT)
            info = client.stages()
        entry = overhead_entry(b) | {
            "stage_weight_bytes": [s.get("info", {}).get("weight_bytes") for s in info],
            "quant_kernel": [s.get("info", {}).get("quant_kernel") for s in info],
            "aggregate_tok_s": {
                n: aggregate(lambda: Client(address, timeout_s=600), n, 128, token_ids=PROMPT)
                for n in (1, 16, 64)
            },
        }
        results.setdefault("weight_formats", {})[fmt] = entry
    finally:
        stop(procs)


def in_process_numbers(model: Path, results: dict) -> None:
    """The whole model as one range on cuda:0, no gRPC: decode step time through the static
    decoder (CUDA graphs) at 1 and 64 rows, and logits for the parity check: every prompt
    position from the general path, the last 8 from decode steps (the graphs)."""
    from protos.shared.model_files import LlamaArgs, read_config
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
    eager = ours.run([Segment(slice(0, n), 0, session.kv)], ids, None, all_logits=True)
    session = cache.begin_step("decode", 0, n - 8)
    ours.run([Segment(slice(0, n - 8), 0, session.kv)], ids[: n - 8], None)
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
    dev = device_of(1)  # the GPU the in-process model did not use, where there are two
    ids = torch.tensor([PROMPT], device=dev)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        ref = LlamaForCausalLM.from_pretrained(str(model), dtype=dtype).to(dev).eval()
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


def main(argv: list[str] | None = None) -> int:
    from bench.mesh import stage_counts

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--stage-counts",
        type=stage_counts,
        default="2,3,4",
        help="batch-1 mesh overhead per token at each of these stage counts (2 always runs)",
    )
    p.add_argument(
        "--quantize",
        default="",
        help="comma list of stage weight formats (none, int8, int4), each a 2-stage mesh "
        "measured first",
    )
    p.add_argument(
        "--formats-only",
        action="store_true",
        help="only the --quantize formats' meshes (none = bf16 measured the same way)",
    )
    p.add_argument(
        "--mesh-only",
        action="store_true",
        help="the mesh numbers alone (no in-process step, parity or transformers): for a "
        "second commit measured in the same call",
    )
    args = p.parse_args(argv)
    counts = args.stage_counts
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    model = Path("/tmp/llama3-8b-random")
    results: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    t0 = time.perf_counter()
    make_model(model)
    results["make_model_s"] = time.perf_counter() - t0
    for fmt in [f for f in args.quantize.split(",") if f]:
        try:
            format_numbers(model, out, results, fmt)
        except Exception as err:  # noqa: BLE001 - recorded; the other formats still run
            results.setdefault("weight_formats", {})[fmt] = {"error": repr(err)}
        (out / "gpu_bench.json").write_text(json.dumps(results, indent=2))
        print(fmt, json.dumps(results["weight_formats"][fmt]), flush=True)
    if args.formats_only:
        return 0
    ours = mesh_numbers(model, out, results, counts)
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=2))  # kept if cut short
    if not args.mesh_only:
        in_process_numbers(model, results)
        torch.cuda.empty_cache()
        parity(model, results)
        transformers_numbers(model, results, ours)
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=2))
    for k, v in results.items():
        if k != "mesh_overhead":
            print(f"{k:36s} {v}")
    for n, o in results["mesh_overhead"].items():
        compute = " + ".join(f"{ms:.2f}" for ms in o["stage_compute_ms_per_token"])
        print(
            f"mesh overhead, {n} stages on {','.join(o['devices'])}: "
            f"{o['decode_tokens_per_s']:.1f} tok/s, compute {compute} ms, "
            f"overhead {o['overhead_ms_per_token']:.2f} ms/token "
            f"(wall - compute {o['overhead_ms_per_token_computed']:.2f}, "
            f"per step {o['overhead_ms_per_step']:.2f}, from timings: {o['overhead_from_timings']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
