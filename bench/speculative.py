"""`python -m bench.mesh --speculative`: batch-1 decode with speculation off against prompt lookup
(and a draft model, with --draft-model), greedy, on the fixed prompt set
bench/prompts/speculative.json: input-grounded prompts (rewrite or continue a passage, code
edits) and free-form chat. Every prompt runs in every mode on one mesh, --repeats times; the
greedy tokens of each mode must equal speculation off's (a mismatch is reported, never hidden).

Printed per group and mode: median decode tok/s over the prompts (each prompt's median over its
repeats), the ratio to off, the acceptance rate (kept drafted tokens over drafted ones) and the
mean tokens per trip through the pipeline.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from client.client import Client

PROMPTS = Path(__file__).resolve().parent / "prompts" / "speculative.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative",
        action="store_true",
        help="only speculative decoding: off vs lookup (vs draft with --draft-model) on "
        "bench/prompts/speculative.json, batch 1, greedy",
    )
    p.add_argument("--draft-model", default="", metavar="DIR", help="--speculative: also draft")
    p.add_argument("--speculate-k", type=int, default=4, help="--speculative: drafts per step")
    p.add_argument("--prompts", default=str(PROMPTS), help="--speculative: the prompt set")
    p.add_argument(
        "--stage-args",
        default="",
        help="--speculative: more stage flags, '{i}' the stage's index: '--device cuda:{i}'",
    )


def one_prompt(client: Client, prompt: dict, modes: list[str], tokens: int, repeats: int) -> dict:
    """Per mode: median decode tok/s, drafted/kept tokens, trips, tokens, and whether the ids
    equal speculation off's."""
    out: dict = {}
    for mode in modes:
        runs = [
            client.generate(messages=prompt["messages"], max_new_tokens=tokens, speculate=mode)
            for _ in range(repeats)
        ]
        t = runs[0].timings
        out[mode] = {
            "decode_tokens_per_s": statistics.median(
                r.timings["decode_tokens_per_s"] for r in runs
            ),
            "tokens": len(runs[0].token_ids),
            "trips": int(t.get("trips", 0)),
            "drafted": int(t.get("drafted_tokens", 0)),
            "accepted": int(t.get("accepted_tokens", 0)),
            "same_as_off": all(r.token_ids == runs[0].token_ids for r in runs)
            and (mode == "off" or runs[0].token_ids == out["off"]["ids"]),
            "ids": runs[0].token_ids,
        }
    return out


def summary(results: dict[str, dict], modes: list[str]) -> dict:
    """Per mode over a group's prompts: median tok/s, ratio to off, acceptance, tokens/trip."""
    rows = {}
    base = statistics.median(r["off"]["decode_tokens_per_s"] for r in results.values())
    for mode in modes:
        per = [r[mode] for r in results.values()]
        tps = statistics.median(p["decode_tokens_per_s"] for p in per)
        drafted = sum(p["drafted"] for p in per)
        rows[mode] = {
            "decode_tokens_per_s": tps,
            "ratio_to_off": tps / base if base else 0.0,
            "acceptance_rate": sum(p["accepted"] for p in per) / drafted if drafted else 0.0,
            "tokens_per_trip": sum(p["tokens"] for p in per) / max(sum(p["trips"] for p in per), 1),
            "exact": all(p["same_as_off"] for p in per),
        }
    return rows


def run(a: argparse.Namespace, model: Path, out: Path) -> int:
    from client.launcher import LocalMesh

    prompts = json.loads(Path(a.prompts).read_text())
    modes = ["off", "lookup"] + (["draft"] if a.draft_model else [])
    extra = ["--speculate-k", str(a.speculate_k)]
    if a.draft_model:
        extra += ["--draft-model", a.draft_model]
    log_dir = out / "logs" / "speculative"
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = a.quantize[0]  # the first --quantize format
    mesh = LocalMesh(
        str(model),
        num_stages=a.stages,
        log_dir=log_dir,
        extra_stage_args=["--quantize", fmt] if fmt != "none" else [],
        per_stage_args=[a.stage_args.format(i=i).split() for i in range(a.stages)],
        extra_orchestrator_args=extra,
    )
    results: dict = {
        "model": str(model), "stages": a.stages, "tokens": a.tokens, "quantize": fmt, "groups": {}
    }  # fmt: skip
    with mesh as m, Client(m.address, timeout_s=600) as client:
        client.generate("Hello", max_new_tokens=8, ignore_eos=True)  # warm-up
        for group in ("grounded", "chat"):
            per_prompt = {
                p["name"]: one_prompt(client, p, modes, a.tokens, a.repeats) for p in prompts[group]
            }
            results["groups"][group] = {
                "prompts": per_prompt,
                "summary": summary(per_prompt, modes),
            }
    (out / "speculative.json").write_text(json.dumps(results, indent=2))
    report(results)
    print(f"json: {out / 'speculative.json'}")
    return 0


def report(r: dict) -> None:
    print(
        f"model {r['model']} ({r['quantize']}), {r['stages']} stages, batch 1, greedy, "
        f"{r['tokens']} new tokens"
    )
    for group, g in r["groups"].items():
        print(f"  {group} ({len(g['prompts'])} prompts; medians over prompts)")
        for mode, row in g["summary"].items():
            exact = "identical to off" if row["exact"] else "DIFFERS FROM OFF"
            print(
                f"    {mode:6s} {row['decode_tokens_per_s']:8.1f} tok/s  "
                f"{row['ratio_to_off']:5.2f}x  acceptance {100 * row['acceptance_rate']:5.1f}%  "
                f"{row['tokens_per_trip']:4.2f} tokens/trip  {exact}"
            )
