"""How bench/mesh.py shows its results: the table it prints (`report`) and, with matplotlib, the
PNG of throughput against concurrency and of the decode step against context (`plot`)."""

from __future__ import annotations

from pathlib import Path


def report(r: dict) -> None:
    b = r["batch1"]
    print(f"model {r['model']}, {r['stages']} stages, medians")
    print(f"  time to first token        {b['ttft_ms']:8.1f} ms")
    print(f"  batch-1 decode             {b['decode_tokens_per_s']:8.1f} tok/s")
    stage_ms = ", ".join(f"{ms:.2f}" for ms in b["stage_compute_ms_per_token"])
    print(f"  stage compute per token    {stage_ms} ms")
    print(f"  per-hop overhead           {b['hop_overhead_ms']:8.3f} ms")
    if b.get("cohorts"):
        print(f"  decode cohorts in flight   {b['cohorts']:8d}")
    for n, tps in r["aggregate_tokens_per_s"].items():
        batch = r.get("aggregate_mean_batch_per_stage", {}).get(n, [])
        rows = f"  (mean batch per stage {', '.join(f'{b:.1f}' for b in batch)})" if batch else ""
        print(f"  {n:>3} concurrent sessions    {tps:8.1f} tok/s aggregate{rows}")
        one_batch = r.get("transformers_batch_tokens_per_s", {}).get(n)
        if one_batch:
            print(
                f"      transformers, {n} prompts as one batch: {one_batch:.1f} tok/s "
                f"(llamadist {tps / one_batch:.2f}x)"
            )
    for c in r["cache_vs_recompute"]:
        print(
            f"  context {c['context']:>5}: KV cache {c['kv_cache_ms']:7.1f} ms/step, "
            f"recompute {c['recompute_ms']:8.1f} ms/step ({c['speedup']:.1f}x)"
        )
    if r["mesh_overhead"]:
        print(
            "  mesh overhead per token, batch 1 (decode wall per token - stage compute per token)"
        )
    for n, o in r["mesh_overhead"].items():
        compute = o["stage_compute_ms_per_token"]
        source = (
            f"timings; wall - compute {o['overhead_ms_per_token_computed']:.2f}"
            if o["overhead_from_timings"]
            else f"wall - compute; per step {o['overhead_ms_per_step']:.2f}"
        )
        print(
            f"  {n:>3} stages {o['decode_tokens_per_s']:8.1f} tok/s, compute "
            f"{' + '.join(f'{ms:.2f}' for ms in compute)} = {sum(compute):.2f} ms, "
            f"overhead {o['overhead_ms_per_token']:.2f} ms ({source})"
        )
    for name, tps in r.get("transformers_tokens_per_s", {}).items():
        ratio = b["decode_tokens_per_s"] / tps
        print(f"  transformers generate, {name}: {tps:.1f} tok/s (llamadist batch-1 {ratio:.2f}x)")
    formats = r.get("weight_formats", {})
    if len(formats) > 1:
        base = r.get("transformers_tokens_per_s", {}).get("1 thread")
        print(f"  weight formats, {r['stages']} stages (batch 1; aggregate at each concurrency)")
        for fmt, f in formats.items():
            tps = f["batch1"]["decode_tokens_per_s"]
            vs = f" = {tps / base:.2f}x transformers 1 thread" if base else ""
            agg = ", ".join(f"{n}: {v:.0f}" for n, v in f["aggregate_tokens_per_s"].items())
            compute = " + ".join(f"{ms:.2f}" for ms in f["batch1"]["stage_compute_ms_per_token"])
            print(f"    {fmt:5s} {tps:7.1f} tok/s{vs}; compute {compute} ms; aggregate {agg}")


def plot(results: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    conc = results["aggregate_tokens_per_s"]
    ctx = results["cache_vs_recompute"]
    if conc:  # --concurrency '' or --contexts '' (bench/compare.sh) leaves a panel empty
        a.plot([int(k) for k in conc], list(conc.values()), "o-", label="llamadist")
        for i, (name, value) in enumerate(results.get("transformers_tokens_per_s", {}).items()):
            label = f"transformers generate ({name})"
            a.axhline(value, linestyle="--", color=f"C{i + 1}", label=label)
        a.set(xscale="log", xlabel="concurrent sessions", ylabel="aggregate tok/s")
        a.set_title("throughput")
        a.legend()
    else:
        a.set_axis_off()
    if ctx:
        b.plot([c["context"] for c in ctx], [c["kv_cache_ms"] for c in ctx], "o-", label="KV cache")
        b.plot(
            [c["context"] for c in ctx], [c["recompute_ms"] for c in ctx], "o-", label="recompute"
        )
        b.set(
            xscale="log",
            yscale="log",
            xlabel="context tokens",
            ylabel="ms per decode step",
            title="decode step",
        )
        b.legend()
    else:
        b.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    return f"plot: {path}"
