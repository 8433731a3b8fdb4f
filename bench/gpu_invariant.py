"""What the batch-invariant mode (#22) costs on a GPU and whether it holds there, in one run
(bench/gpu.sh's machine; `python3 bench/gpu_invariant.py` after the protobuf code is made):

1. In process, the 8B-shaped random bf16 model as one range on cuda:0 through the static
   decoder (CUDA graphs): the decode step at 1 and 64 rows, default kernels vs the mode's
   (invariant_gpu.py); with the mode, slot 0's logits decoded alone equal them decoded beside
   63 other rows bit for bit, and the default's do or do not (reported); the mode's logits
   against the default's (relative norm).
2. Two stages on cuda:0 behind an orchestrator, default vs --batch-invariant, one after the
   other: batch-1 tok/s (128 tokens, median of 3) and aggregate tok/s at 16 and 64 sessions.
Writes gpu_invariant.json to $OUT and prints it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import start_mesh, stop  # noqa: E402
from gpu_model import PROMPT, make_model  # noqa: E402


def in_process(model: Path, invariant: bool, results: dict) -> torch.Tensor:
    from protos.shared.model_files import LlamaArgs, read_config
    from stage_service.decode import StaticDecoder
    from stage_service.fused_layers import range_model
    from stage_service.kv_cache import CacheShape, SessionCache
    from stage_service.model import Segment
    from stage_service.weights import load_range

    name = "invariant" if invariant else "default"
    dev = torch.device("cuda:0")
    args = LlamaArgs.from_config(read_config(model))
    weights = load_range(model, args, 0, args.num_layers, torch.bfloat16, dev)
    ours = range_model(args, weights, dev, batch_invariant=invariant)
    shape = CacheShape(args.num_layers, args.num_kv_heads, args.head_dim, torch.bfloat16, dev, 256)
    cache = SessionCache(shape, 65 * 256 * shape.bytes_per_token, 600, static=True)
    decoder = StaticDecoder(ours, cache.pool, 64, graphs=True)
    t0 = time.perf_counter()
    decoder.capture_all()
    results[f"{name}_capture_s"] = time.perf_counter() - t0
    slots = [cache.begin_step(f"t{i}", 0, 100).slot for i in range(64)]
    for i, slot in enumerate(slots):  # each slot's prefill: a different prompt
        ids = torch.tensor([(t + 31 * i) % 128000 for t in range(100)], device=dev)
        segment = Segment(slice(0, 100), 0, cache.pool.views(slot), slot)
        ours.run([segment], ids, None, pool=cache.pool)
    alone = decoder.run(slots[:1], [100], [7], None).clone()
    crowded = decoder.run(slots, [100] * 64, [7 + i for i in range(64)], None)[:1].clone()
    results[f"{name}_alone_equals_crowded"] = bool(torch.equal(alone, crowded))
    results[f"{name}_alone_vs_crowded_max_diff"] = float((alone - crowded).abs().max())
    for rows in (1, 64):
        times = []
        for pos in range(101, 141):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            decoder.run(slots[:rows], [pos] * rows, [7] * rows, None).argmax(-1).tolist()
            times.append(time.perf_counter() - t0)
        results[f"{name}_decode_ms_batch{rows}"] = statistics.median(times[5:]) * 1e3
    del decoder, ours, weights, cache
    torch.cuda.empty_cache()
    return alone.cpu()


def tiles(model: Path, configs: list[str], results: dict) -> None:
    """In process, for each matmul tile configuration "BM,BN,BK" of invariant_gpu.py (and the
    default kernels): a 64-session prefill (64 x 32 rows, one forward) and a 1- and 64-row
    decode step without graphs, medians of 5; and whether slot 0 decoded alone equals it
    decoded beside 63 others."""
    from protos.shared.model_files import LlamaArgs, read_config
    from stage_service import invariant_gpu
    from stage_service.fused_layers import range_model
    from stage_service.kv_cache import CacheShape, SessionCache
    from stage_service.model import Segment
    from stage_service.weights import load_range

    dev = torch.device("cuda:0")
    args = LlamaArgs.from_config(read_config(model))
    weights = load_range(model, args, 0, args.num_layers, torch.bfloat16, dev)
    shape = CacheShape(args.num_layers, args.num_kv_heads, args.head_dim, torch.bfloat16, dev, 256)
    cache = SessionCache(shape, 65 * 256 * shape.bytes_per_token, 600, static=True)
    slots = [cache.begin_step(f"t{i}", 0, 100).slot for i in range(64)]
    pool = cache.pool

    def timed(fn) -> float:
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) * 1e3

    for config in ["default", *configs]:
        invariant = config != "default"
        if invariant:
            bm, bn, bk = (int(v) for v in config.split(","))
            invariant_gpu.BLOCK_M, invariant_gpu.BLOCK_N, invariant_gpu.BLOCK_K = bm, bn, bk
        ours = range_model(args, weights, dev, batch_invariant=invariant)
        segments = [
            Segment(slice(32 * i, 32 * i + 32), 0, pool.views(s), s) for i, s in enumerate(slots)
        ]
        ids = torch.tensor([(t * 7 + i) % 128000 for i in range(64) for t in range(32)], device=dev)
        entry = {
            "prefill_2048_rows_ms": timed(
                lambda: ours.run(segments, ids, None, pool=pool)  # noqa: B023
            )
        }
        for rows in (1, 64):
            segs = [
                Segment(slice(i, i + 1), 40, pool.views(s), s) for i, s in enumerate(slots[:rows])
            ]
            step = torch.tensor([7] * rows, device=dev)
            entry[f"decode_{rows}_rows_ms_eager"] = timed(
                lambda: ours.run(segs, step, None, pool=pool)  # noqa: B023
            )
        one = ours.run(segs[:1], step[:1], None, pool=pool)
        many = ours.run(segs, step, None, pool=pool)[:1]
        entry["alone_equals_crowded"] = bool(torch.equal(one, many))
        results.setdefault("tiles", {})[config] = entry
        print(config, json.dumps(entry), flush=True)


def mesh(model: Path, log_dir: Path, name: str, extra: tuple[str, ...], results: dict) -> None:
    from bench.mesh import aggregate, batch1
    from client.client import Client

    procs: list = []
    try:
        address = start_mesh(model, log_dir, 2, 16000, procs, extra=extra)
        with Client(address, timeout_s=600) as client:
            client.generate(token_ids=PROMPT, max_new_tokens=16, ignore_eos=True)  # warm-up
            b = batch1(client, 128, 3, token_ids=PROMPT, speculate="off")
        results[f"{name}_mesh_batch1_tok_s"] = b["decode_tokens_per_s"]
        for n in (16, 64):
            results[f"{name}_mesh_aggregate_tok_s_{n}"] = aggregate(
                lambda: Client(address, timeout_s=600), n, 128, token_ids=PROMPT, speculate="off"
            )
    finally:
        stop(procs)


def main() -> int:
    mesh_only = "--mesh-only" in sys.argv  # the meshes alone, e.g. for a change to them
    configs = [a.removeprefix("--tiles=") for a in sys.argv if a.startswith("--tiles=")]
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    model = Path("/tmp/llama3-8b-random")
    make_model(model)
    results: dict = {"device": torch.cuda.get_device_name(0)}
    if configs:  # tile configurations compared in process, nothing else
        tiles(model, configs[0].split(";"), results)
        (out / "gpu_invariant.json").write_text(json.dumps(results, indent=2))
        return 0
    if not mesh_only:
        default = in_process(model, False, results)
        invariant = in_process(model, True, results)
        results["invariant_vs_default_rel"] = float((invariant - default).norm() / default.norm())
        results["same_greedy_token"] = bool(invariant.argmax(-1).equal(default.argmax(-1)))
        (out / "gpu_invariant.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2), flush=True)
    meshes = {"default": (), "invariant": ("--batch-invariant", "on")}
    if "--uncompiled" in sys.argv:  # the default without --compile (the mode ignores it)
        meshes["uncompiled"] = ("--no-compile",)
    for name, extra in meshes.items():
        mesh(model, out, name, extra, results)
        (out / "gpu_invariant.json").write_text(json.dumps(results, indent=2))
    for key in ("batch1_tok_s", "aggregate_tok_s_16", "aggregate_tok_s_64"):
        d, i = results[f"default_mesh_{key}"], results[f"invariant_mesh_{key}"]
        results[f"ratio_{key}"] = i / d
    (out / "gpu_invariant.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
