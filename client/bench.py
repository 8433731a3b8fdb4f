"""`llamadist bench`: the mesh measured against transformers' in-process generate, same weights,
same run. Prints a table, writes JSON and (with matplotlib) a PNG plot.

Measured: time to first token; batch-1 decode tok/s; aggregate tok/s at several numbers of
concurrent sessions; per-stage compute ms and per-hop overhead ms per token; the decode step with
the KV cache against recomputing the prefix at several context lengths; transformers' generate.
Medians of --repeats runs. Nothing else runs while a number is taken.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

from client.client import Client

PROMPT = "What is the capital of France?"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="", help="measure this orchestrator (default: start a mesh)")
    p.add_argument("--model", default="", help="model directory (default: the default model)")
    p.add_argument("--stages", type=int, default=2, help="stages of the mesh it starts")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per batch-1 run")
    p.add_argument("--repeats", type=int, default=3, help="runs per number (medians)")
    p.add_argument("--concurrency", default="1,4,16,64", help="concurrent sessions to measure")
    p.add_argument("--concurrent-tokens", type=int, default=32, help="new tokens per session")
    p.add_argument("--contexts", default="64,256,1024", help="context lengths: cache vs recompute")
    p.add_argument("--no-transformers", action="store_true", help="skip the in-process baseline")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")


def batch1(client: Client, tokens: int, repeats: int) -> dict:
    runs = [
        client.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True).timings
        for _ in range(repeats)
    ]
    stages = len(runs[0]["stages"])
    return {
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "hop_overhead_ms": statistics.median(r["hop_overhead_ms"] for r in runs),
        "stage_compute_ms_per_token": [
            statistics.median(r["stages"][i]["compute_ms"] / r["stages"][i]["steps"] for r in runs)
            for i in range(stages)
        ],
    }


def aggregate(client_factory, sessions: int, tokens: int, **request) -> float:
    """Aggregate generated tok/s with `sessions` generations running at once (`request`: the
    input, PROMPT by default)."""
    request = request or {"prompt": PROMPT}
    counts: list[int] = []
    errors: list[Exception] = []

    def one() -> None:
        try:
            with client_factory() as c:
                reply = c.generate(max_new_tokens=tokens, ignore_eos=True, **request)
                counts.append(len(reply.token_ids))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {sessions} sessions failed: {errors[0]}")
    return sum(counts) / (time.perf_counter() - t0)


def cache_vs_recompute(client: Client, context: int, vocab: int) -> dict:
    """ms per decode step at `context` tokens with the KV cache, and without it (a step that
    recomputes the prefix costs a prefill of `context` tokens)."""
    ids = [(i * 7919) % (vocab - 1) + 1 for i in range(context)]
    cached = client.generate(token_ids=ids, max_new_tokens=16, ignore_eos=True).timings
    recompute = [
        client.generate(token_ids=ids, max_new_tokens=1, ignore_eos=True).timings["ttft_ms"]
        for _ in range(3)
    ]
    with_cache = 1e3 / cached["decode_tokens_per_s"]
    without = statistics.median(recompute)
    return {
        "context": context,
        "kv_cache_ms": with_cache,
        "recompute_ms": without,
        "speedup": without / with_cache,
    }


def transformers_generate(model: Path, tokens: int, repeats: int, threads: int) -> float:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model))
    ref = LlamaForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    config = ref.generation_config
    config.eos_token_id, config.pad_token_id = None, 0
    config.max_new_tokens, config.do_sample = tokens, False
    speeds = []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            out = ref.generate(ids, generation_config=config)
            if i:
                speeds.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    return statistics.median(speeds)


def plot(results: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    conc = results["aggregate_tokens_per_s"]
    a.plot([int(k) for k in conc], list(conc.values()), "o-", label="llamadist")
    for i, (name, value) in enumerate(results.get("transformers_tokens_per_s", {}).items()):
        a.axhline(value, linestyle="--", color=f"C{i + 1}", label=f"transformers generate ({name})")
    a.set(xscale="log", xlabel="concurrent sessions", ylabel="aggregate tok/s", title="throughput")
    a.legend()
    ctx = results["cache_vs_recompute"]
    b.plot([c["context"] for c in ctx], [c["kv_cache_ms"] for c in ctx], "o-", label="KV cache")
    b.plot([c["context"] for c in ctx], [c["recompute_ms"] for c in ctx], "o-", label="recompute")
    b.set(
        xscale="log",
        yscale="log",
        xlabel="context tokens",
        ylabel="ms per decode step",
        title="decode step",
    )
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"plot: {path}"


def run(a: argparse.Namespace) -> int:
    from client.default_model import fetch_default
    from client.launcher import LocalMesh
    from protos.knobs import check_value
    from stage_service.config import StageConfig

    model = Path(a.model) if a.model else fetch_default()
    check_value(StageConfig, "model", str(model))  # before a mesh starts on it
    concurrency = [int(c) for c in a.concurrency.split(",") if c]
    mesh = (
        nullcontext(None)
        if a.server
        else LocalMesh(
            str(model),
            num_stages=a.stages,
            extra_orchestrator_args=["--max-sessions-per-client", str(max(concurrency + [1]))],
        )
    )
    results: dict = {"model": str(model), "stages": a.stages, "tokens": a.tokens}
    with mesh as m:
        address = a.server or m.address
        with Client(address, timeout_s=600) as client:
            client.generate(PROMPT, max_new_tokens=8, ignore_eos=True)  # warm-up
            results["batch1"] = batch1(client, a.tokens, a.repeats)
            vocab = json.loads((model / "config.json").read_text())["vocab_size"]
            results["cache_vs_recompute"] = [
                cache_vs_recompute(client, int(c), vocab) for c in a.contexts.split(",") if c
            ]
        results["aggregate_tokens_per_s"] = {
            str(n): aggregate(lambda: Client(address, timeout_s=600), n, a.concurrent_tokens)
            for n in concurrency
        }
    if not a.no_transformers:
        results["transformers_tokens_per_s"] = {
            f"{t} thread{'s' if t > 1 else ''}": transformers_generate(
                model, a.tokens, a.repeats, t
            )
            for t in (1, 2)
        }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    report(results)
    print(f"json: {out / 'bench.json'}; {plot(results, out / 'bench.png')}")
    return 0


def report(r: dict) -> None:
    b = r["batch1"]
    print(f"model {r['model']}, {r['stages']} stages, medians")
    print(f"  time to first token        {b['ttft_ms']:8.1f} ms")
    print(f"  batch-1 decode             {b['decode_tokens_per_s']:8.1f} tok/s")
    stage_ms = ", ".join(f"{ms:.2f}" for ms in b["stage_compute_ms_per_token"])
    print(f"  stage compute per token    {stage_ms} ms")
    print(f"  per-hop overhead           {b['hop_overhead_ms']:8.3f} ms")
    for n, tps in r["aggregate_tokens_per_s"].items():
        print(f"  {n:>3} concurrent sessions    {tps:8.1f} tok/s aggregate")
    for c in r["cache_vs_recompute"]:
        print(
            f"  context {c['context']:>5}: KV cache {c['kv_cache_ms']:7.1f} ms/step, "
            f"recompute {c['recompute_ms']:8.1f} ms/step ({c['speedup']:.1f}x)"
        )
    for name, tps in r.get("transformers_tokens_per_s", {}).items():
        ratio = b["decode_tokens_per_s"] / tps
        print(f"  transformers generate, {name}: {tps:.1f} tok/s (llamadist batch-1 {ratio:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamadist bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
