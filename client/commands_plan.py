"""`llamadist plan show|preview|reload` (the partition plan) and `llamadist health`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading

from client import server_flags
from client.client import stage_health
from orchestrator.plan_spec import STRATEGIES
from protos.shared.knob_checks import non_negative
from protos.shared.knobs import checked, split_list


def _strategy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--strategy",
        required=True,
        choices=STRATEGIES,
        help="uniform: equal layer counts; memory: within memory limits; compute: fastest by "
        "measured stage speed; mixed: compute within memory limits; custom: --boundaries",
    )
    p.add_argument(
        "--max-memory",
        default="",
        help="memory limit for weights + KV: 4GB for every stage, "
        "or 4GB,8GB one per stage (default: each stage's free memory)",
    )
    p.add_argument("--boundaries", default="", help="custom: inclusive ranges such as 0-9,10-29")
    p.add_argument(
        "--num-partitions",
        type=checked(int, non_negative),
        default=0,
        help="use the first N stages (0 = all)",
    )
    p.add_argument("--stages", default="", help="new stage list H:P,H:P (default: current)")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="plan_command", required=True)
    show = sub.add_parser("show", help="a table of stages and their layers")
    preview = sub.add_parser("preview", help="the plan a strategy would make; no change")
    reload = sub.add_parser("reload", help="apply a new plan while serving")
    for q in (show, preview, reload):
        server_flags.add_arguments(q)
        q.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    for q in (preview, reload):
        _strategy_arguments(q)


def _source(group: str, stages: dict[str, dict]) -> str:
    """Where a position's weights came from (its replicas', joined): local, submodel, wire..."""
    found = {stages[a]["info"].get("weights_source", "") for a in group.split("+") if a in stages}
    return ",".join(sorted(found - {""})) or "-"


def _print_plan(plan: dict, stages: dict[str, dict], as_json: bool) -> int:
    rows = []
    # Columns are the plan's, not a row's: every row has the same keys, a stage sent nothing
    # shows 0 (the table's header comes from the first row).
    shipped = any(int(s.get("fetch_bytes", 0)) for s in plan["stages"])
    timed = any(s.get("fetch_seconds") for s in plan["stages"])  # reload: how long it took
    for s in plan["stages"]:
        status = stages.get(s["address"].split("+")[0], {})
        extra = {}
        if stages:  # plan show: what each stage reports it loaded from
            extra["source"] = _source(s["address"], stages)
        if shipped:  # preview: what would travel; reload: what did
            extra["fetch_mb"] = round(int(s.get("fetch_bytes", 0)) / 1e6, 1)
        if timed:
            extra["fetch_s"] = round(float(s.get("fetch_seconds", 0.0)), 2)
        rows.append(
            {
                "stage": s["index"],
                "address": s["address"],
                "device": s["device"],
                "layers": f"{s['layer_start']}-{s['layer_end'] - 1}",
                "weight_mb": round(int(s["weight_bytes"]) / 2**20, 1),
                "weights": s.get("quantize") or "none",  # the stage's format (--quantize)
                "kv_tokens": int(s["kv_capacity_tokens"]),
                "est_ms_per_token": round(s["est_ms_per_token"], 2),
                **extra,
                "reachable": status.get("reachable", True),
            }
        )
    if as_json:
        print(
            json.dumps(
                {
                    "epoch": int(plan["epoch"]),
                    "strategy": plan["strategy"],
                    "max_context": int(plan["max_context"]),
                    "stages": rows,
                }
            )
        )
    else:
        print(
            f"plan epoch {plan['epoch']}, strategy {plan['strategy']}, "
            f"{plan['num_layers']} layers, sessions up to {plan['max_context']} tokens"
        )
        header = list(rows[0])[:-1] if rows else []
        table = [header] + [[str(r[h]) for h in header] for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 0 if all(r["reachable"] for r in rows) else 1


def run_plan(a: argparse.Namespace) -> int:
    with server_flags.connect(a) as client:
        if a.plan_command == "show":
            plan = client.plan()
            return _print_plan(plan, {s["address"]: s for s in client.stages()}, a.json)
        spec = dict(
            strategy=a.strategy,
            num_partitions=a.num_partitions,
            max_memory=a.max_memory,
            boundaries=a.boundaries,
            stages=list(split_list(a.stages)),
        )
        if a.plan_command == "preview":
            return _print_plan(client.preview_plan(**spec), {}, a.json)
        return _print_plan(reload_with_progress(client, spec), {}, a.json)


def reload_with_progress(client, spec: dict, every_s: float = 1.0) -> dict:
    """ReloadPlan, printing (to stderr) the weights each stage is being sent meanwhile."""
    result: dict = {}

    def reload() -> None:
        try:
            result["plan"] = client.reload_plan(**spec)
        except BaseException as err:  # noqa: BLE001 - raised again below
            result["error"] = err

    thread = threading.Thread(target=reload, daemon=True)
    thread.start()
    thread.join(every_s)
    while thread.is_alive():
        with contextlib.suppress(Exception):  # progress is a courtesy; the reload decides
            for s in client.stages():
                if s.get("transfer"):
                    print(f"{s['address']}: weights {s['transfer']}", file=sys.stderr)
        thread.join(every_s)
    if "error" in result:
        raise result["error"]
    return result["plan"]


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    server_flags.add_arguments(p)
    p.add_argument(
        "--stage",
        action="store_true",
        help="ask a stage: alive is enough, it gets its layers from the orchestrator later",
    )


def run_health(a: argparse.Namespace) -> int:
    if a.stage:
        ok, detail = stage_health(a.server, **server_flags.tls(a))
        print("SERVING" if ok else f"NOT_SERVING: {detail}")
        return 0
    with server_flags.client(a) as client:
        ok, detail = client.health()
    print("SERVING" if ok else f"NOT_SERVING: {detail}")
    return 0 if ok else 1
