"""The mesh benchmark (`make bench`, `python -m bench.mesh`): the mesh measured against
transformers' in-process generate, same weights, same run. Prints a table, writes JSON and (with
matplotlib) a PNG plot.

Measured: time to first token; batch-1 decode tok/s; aggregate tok/s at several numbers of
concurrent sessions; per-stage compute ms and per-hop overhead ms per token; the decode step with
the KV cache against recomputing the prefix at several context lengths; transformers' generate;
and, on a mesh of each of --stage-counts stages, batch-1 decode with its mesh overhead per token:
the decode wall time per token minus the stages' compute per token (what the mesh adds to the
model's own arithmetic). Medians of --repeats runs. Nothing else runs while a number is taken.

bench/compare.sh runs this file against two commits (their services, this driver). It runs
from a source checkout: bench/ is not part of the installed package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

from bench import speculative
from bench.mesh_report import plot, report
from client.client import Client

PROMPT = "What is the capital of France?"
QUALITY_TEXT = "declaration.txt"  # in tests/data: public-domain, ~2,900 tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="", help="measure this orchestrator (default: start a mesh)")
    p.add_argument("--model", default="", help="model directory (default: the default model)")
    p.add_argument("--stages", type=int, default=2, help="stages of the mesh it starts")
    p.add_argument(
        "--stage-counts",
        type=stage_counts,
        default="2,3,4",
        help="batch-1 mesh overhead per token on a mesh of each of these stage counts "
        "('' skips; with --server only the server's own count)",
    )
    p.add_argument("--tokens", type=int, default=128, help="new tokens per batch-1 run")
    p.add_argument("--repeats", type=int, default=3, help="runs per number (medians)")
    p.add_argument("--concurrency", default="1,4,16,64", help="concurrent sessions to measure")
    p.add_argument("--concurrent-tokens", type=int, default=32, help="new tokens per session")
    p.add_argument("--contexts", default="64,256,1024", help="context lengths: cache vs recompute")
    p.add_argument("--no-transformers", action="store_true", help="skip the in-process baseline")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")
    p.add_argument(
        "--quantize",
        type=weight_formats,
        default="none",
        help="stage weight formats to measure (comma list of none, int8, int4): batch 1 and "
        "the concurrency runs on a mesh of each; the rest on the first",
    )
    p.add_argument(
        "--quality",
        action="store_true",
        help="only the perplexity of each --quantize format (and float32) on "
        "tests/data/declaration.txt, computed in this process by the stages' own code",
    )

    speculative.add_arguments(p)


def weight_formats(text: str) -> list[str]:
    from stage_service.config import QUANTIZE

    formats = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in QUANTIZE]
    if bad or not formats:
        raise argparse.ArgumentTypeError(f"weight formats are {', '.join(QUANTIZE)}; got {text!r}")
    return formats


def stage_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of stage counts: {text!r}") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"stage counts must be >= 1: {text!r}")
    return counts


def per_token(t: dict) -> dict:
    """One batch-1 generation's timings per decoded token.

    Mesh overhead per token: `timings["mesh_overhead_ms"]` where the orchestrator reports it
    (its mean over steps of step wall time minus every stage's compute); else (0 or absent: an
    orchestrator from before the field) computed here as the decode wall time per token minus the
    stages' compute per token (compute_ms / steps, summed over the stages). The computation is
    always kept as `overhead_ms_per_token_computed`, so two commits compare by one formula; its
    compute includes the prefill step's, which puts it ~0.3-0.5 ms low at 128 tokens on CPU.
    `overhead_ms_per_step` is the orchestrator's per-step figure on either commit: the field, or
    hop_overhead_ms (the same mean per stage call) times the stages."""
    stage_ms = [s["compute_ms"] / max(s["steps"], 1) for s in t["stages"]]
    wall_ms = 1e3 / t["decode_tokens_per_s"]
    computed = wall_ms - sum(stage_ms)
    reported = t.get("mesh_overhead_ms") or 0.0
    return {
        "ttft_ms": t["ttft_ms"],
        "decode_tokens_per_s": t["decode_tokens_per_s"],
        "decode_ms_per_token": wall_ms,
        "hop_overhead_ms": t["hop_overhead_ms"],
        "stage_compute_ms_per_token": stage_ms,
        "overhead_ms_per_token": reported or computed,
        "overhead_ms_per_token_computed": computed,
        "overhead_ms_per_step": reported or t["hop_overhead_ms"] * len(stage_ms),
        "overhead_from_timings": bool(reported),
        "cohorts": t.get("cohorts", 0),  # the scheduler's (0: an orchestrator without one)
    }


def batch1(client: Client, tokens: int, repeats: int, **request) -> dict:
    """Medians of `repeats` batch-1 generations of `tokens` new tokens (`request`: the input,
    PROMPT by default); each generation's own numbers under "runs"."""
    request = request or {"prompt": PROMPT}
    runs = [
        per_token(client.generate(max_new_tokens=tokens, ignore_eos=True, **request).timings)
        for _ in range(repeats)
    ]
    stages = len(runs[0]["stage_compute_ms_per_token"])
    result = {
        key: statistics.median(r[key] for r in runs)
        for key in (
            "ttft_ms",
            "decode_tokens_per_s",
            "decode_ms_per_token",
            "hop_overhead_ms",
            "overhead_ms_per_token",
            "overhead_ms_per_token_computed",
            "overhead_ms_per_step",
        )
    }
    result["stage_compute_ms_per_token"] = [
        statistics.median(r["stage_compute_ms_per_token"][i] for r in runs) for i in range(stages)
    ]
    result["stages"] = stages
    result["cohorts"] = runs[-1]["cohorts"]
    result["overhead_from_timings"] = all(r["overhead_from_timings"] for r in runs)
    result["runs"] = runs
    return result


def aggregate(
    client_factory,
    sessions: int,
    tokens: int,
    batches: list | None = None,
    step_ms: list | None = None,
    **request,
) -> float:
    """Aggregate generated tok/s with `sessions` generations running at once (`request`: the
    input, PROMPT by default). `batches`, when given, gets each generation's mean batch size
    per stage (where the orchestrator reports it); `step_ms` each stage's compute per step
    (the batch's wall time inside the stage's compute thread)."""
    request = request or {"prompt": PROMPT}
    counts: list[int] = []
    errors: list[Exception] = []

    def one() -> None:
        try:
            with client_factory() as c:
                reply = c.generate(max_new_tokens=tokens, ignore_eos=True, **request)
                counts.append(len(reply.token_ids))
                stages = reply.timings.get("stages", [])
                if batches is not None:
                    batches.append([s.get("mean_batch_size", 0.0) for s in stages])
                if step_ms is not None:
                    step_ms.append([s["compute_ms"] / max(s.get("steps", 1), 1) for s in stages])
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


def median_per_stage(runs: list[list[float]]) -> list[float]:
    """The median over generations of each stage's value (mean batch, ms a step; [] if none)."""
    if not runs or not runs[0]:
        return []
    return [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]


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


def transformers_generate(
    model: Path, tokens: int, repeats: int, threads: int, batch: int = 1
) -> float:
    """transformers' greedy generate of `batch` copies of PROMPT as one batch in this process:
    generated tok/s over the whole call, prefill included (as `aggregate` counts the mesh)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model))
    ref = LlamaForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids = torch.tensor([tok(PROMPT)["input_ids"]] * batch)
    config = ref.generation_config
    config.eos_token_id, config.pad_token_id = None, 0
    config.max_new_tokens, config.do_sample = tokens, False
    speeds = []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            out = ref.generate(ids, generation_config=config)
            if i:
                new = out.shape[0] * (out.shape[1] - ids.shape[1])
                speeds.append(new / (time.perf_counter() - t0))
    return statistics.median(speeds)


def run(a: argparse.Namespace) -> int:
    from client.default_model import fetch_default
    from client.launcher import LocalMesh
    from protos.shared.knobs import check_value
    from stage_service.config import StageConfig

    model = Path(a.model) if a.model else fetch_default()
    check_value(StageConfig, "model", str(model))  # before a mesh starts on it
    if a.tokens < 2:
        raise ValueError(
            f"--tokens must be at least 2 (decode is timed after the first token), got {a.tokens}"
        )
    concurrency = [int(c) for c in a.concurrency.split(",") if c]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    if a.quality:
        return quality(model, a.quantize, out)
    if a.speculative:
        return speculative.run(a, model, out)
    formats = a.quantize

    def mesh_of(stages: int, sessions: int = 1, fmt: str = formats[0]) -> LocalMesh:
        log_dir = out / "logs" / f"stages-{stages}-{fmt}"  # the services' logs, kept on failure
        log_dir.mkdir(parents=True, exist_ok=True)
        return LocalMesh(
            str(model),
            num_stages=stages,
            log_dir=log_dir,
            # Only when quantizing: bench/compare.sh drives older stages that lack the flag.
            extra_stage_args=["--quantize", fmt] if fmt != "none" else [],
            extra_orchestrator_args=["--max-sessions-per-client", str(max(sessions, 1))],
        )

    sessions = max(concurrency + [1])
    mesh = nullcontext(None) if a.server else mesh_of(a.stages, sessions)
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
        batches: dict[str, list] = {str(n): [] for n in concurrency}
        results["aggregate_tokens_per_s"] = {
            str(n): aggregate(
                lambda: Client(address, timeout_s=600), n, a.concurrent_tokens, batches[str(n)]
            )
            for n in concurrency
        }
        results["aggregate_mean_batch_per_stage"] = {
            n: median_per_stage(runs) for n, runs in batches.items()
        }
    results["stages"] = results["batch1"]["stages"]  # the server's, with --server
    results["weight_formats"] = {
        formats[0]: {
            "batch1": results["batch1"],
            "aggregate_tokens_per_s": results["aggregate_tokens_per_s"],
        }
    }
    for fmt in formats[1:] if not a.server else []:
        with mesh_of(a.stages, sessions, fmt) as m, Client(m.address, timeout_s=600) as client:
            client.generate(PROMPT, max_new_tokens=8, ignore_eos=True)  # warm-up
            results["weight_formats"][fmt] = {
                "batch1": batch1(client, a.tokens, a.repeats),
                "aggregate_tokens_per_s": {
                    str(n): aggregate(
                        lambda m=m: Client(m.address, timeout_s=600), n, a.concurrent_tokens
                    )
                    for n in concurrency
                },
            }
    overhead: dict[int, dict] = {}
    for n in a.stage_counts:
        if n == results["stages"]:
            overhead[n] = results["batch1"]  # the same runs: same mesh, same batch 1
        elif a.server:
            print(
                f"--server: no {n}-stage mesh started (mesh overhead at {results['stages']} only)"
            )
        else:
            with mesh_of(n) as m, Client(m.address, timeout_s=600) as client:
                client.generate(PROMPT, max_new_tokens=8, ignore_eos=True)  # warm-up
                overhead[n] = batch1(client, a.tokens, a.repeats)
    results["mesh_overhead"] = {str(n): overhead[n] for n in sorted(overhead)}
    if not a.no_transformers:
        results["transformers_tokens_per_s"] = {
            f"{t} thread{'s' if t > 1 else ''}": transformers_generate(
                model, a.tokens, a.repeats, t
            )
            for t in (1, 2)
        }
        threads = os.cpu_count() or 1  # the mesh's stages share the machine's cores
        results["transformers_batch_tokens_per_s"] = {
            str(n): transformers_generate(model, a.concurrent_tokens, a.repeats, threads, n)
            for n in concurrency
            if n > 1
        }
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    report(results)
    print(f"json: {out / 'bench.json'}; {plot(results, out / 'bench.png')}")
    return 0


def quality(model: Path, formats: list[str], out: Path) -> int:
    """Perplexity of float32 and each weight format on the fixed text (tests/data)."""
    from transformers import AutoTokenizer

    from stage_service.config import DEFAULT_GROUP
    from stage_service.perplexity import perplexity
    from stage_service.weights import Quantization

    path = Path(__file__).resolve().parent.parent / "tests" / "data" / QUALITY_TEXT
    if not path.exists():
        raise ValueError(f"--quality reads {path}: run it from a source checkout of llamadist")
    text = path.read_text()
    ids = AutoTokenizer.from_pretrained(str(model))(text)["input_ids"]
    results = {"model": str(model), "text": QUALITY_TEXT, "tokens": len(ids), "perplexity": {}}
    base = None
    print(f"perplexity on tests/data/{QUALITY_TEXT} ({len(ids)} tokens), {model}")
    for fmt in ["none", *[f for f in formats if f != "none"]]:
        t0 = time.perf_counter()
        value = perplexity(model, ids, Quantization(fmt, DEFAULT_GROUP.get(fmt, 0)))
        base = base or value
        results["perplexity"][fmt] = value
        print(
            f"  {fmt:5s} {value:9.4f}  {100 * (value / base - 1):+6.2f}% against float32 "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    print(f"json: {out / 'quality.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark as `llamadist` runs a command: a failure is one line on stderr."""
    # here, not at the top: bench/compare.sh runs `run` against older commits' client code
    from client.cli import Parser
    from client.cli import main as run_command

    parser = Parser(prog="python -m bench.mesh", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return run_command(argv, parser)


if __name__ == "__main__":
    sys.exit(main())
