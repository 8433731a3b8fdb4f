"""`llamadist model fetch-default` (the embedded default model) and `llamadist certs`
(a development CA, certificates and API keys)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from protos.shared.knob_checks import positive
from protos.shared.knobs import checked


def _writable_target(path: str) -> None:
    """The nearest existing folder on the way to `path` must be a folder this process may
    write in (checked before minutes of installing and converting)."""
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"--dir {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--dir {path}: cannot write in {existing}")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model_command", required=True)
    fetch = sub.add_parser("fetch-default", help="install and convert SmolLM2-135M-Instruct")
    fetch.add_argument("--dir", default=None, help="target directory (default: the cache)")
    split = sub.add_parser(
        "split", help="one submodel directory per stage, each with only its layers' tensors"
    )
    split.add_argument("--model", required=True, metavar="DIR", help="the full model")
    split.add_argument("--out", required=True, metavar="OUT", help="writes OUT/stage-<i>")
    split.add_argument("--stages", type=checked(int, positive), default=0, help="how many")
    split.add_argument("--strategy", default="uniform", help="uniform, memory, compute, mixed")
    split.add_argument("--max-memory", default="", help="as for plan preview (memory, mixed)")
    split.add_argument("--boundaries", default="", help="explicit ranges, e.g. 0-9,10-29")


def run_model(a: argparse.Namespace) -> int:
    if a.model_command == "split":
        return run_split(a)
    from client.default_model import fetch_default

    if a.dir:
        _writable_target(a.dir)
    print(fetch_default(a.dir))
    return 0


def split_ranges(model: Path, stages: int, strategy: str, max_memory: str, boundaries: str):
    """The layer ranges of a split: --boundaries as given, or the planner's strategy over
    `stages` stages of equal speed (and each --max-memory, for memory and mixed)."""
    from orchestrator.plan_spec import spec_from_text
    from orchestrator.profile import ModelProfile, StageCapacity
    from orchestrator.strategies import make_plan

    if boundaries:
        spec = spec_from_text("custom", 0, "", boundaries)
        stages = len(spec.custom_boundaries)
    else:
        if not stages:
            raise ValueError("give --stages N (with --strategy) or --boundaries")
        spec = spec_from_text(strategy, 0, max_memory, "")
    capacities = [
        StageCapacity(f"stage-{i}", "cpu", memory_bytes=2**62, kv_budget_bytes=0, gflops=1.0)
        for i in range(stages)
    ]
    plan = make_plan(ModelProfile.from_model_dir(model), capacities, spec)
    return [(r.start, r.end) for r in plan.ranges]


def run_split(a: argparse.Namespace) -> int:
    from protos.shared.submodel import split

    model = Path(a.model)
    _writable_target(a.out)
    ranges = split_ranges(model, a.stages, a.strategy, a.max_memory, a.boundaries)
    for d, (start, end) in zip(split(model, Path(a.out), ranges), ranges, strict=True):
        print(f"{d}: layers {start}-{end - 1}")
    flags = ",".join(f"{start}-{end - 1}" for start, end in ranges)
    print(
        f"start each stage with --model OUT/stage-<i>; the orchestrator (on the full model) "
        f"with --strategy custom --boundaries {flags}"
    )
    return 0


def add_certs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for the PEM files")
    p.add_argument(
        "--hosts",
        action="append",
        default=[],
        help="more names or IP addresses for the server certificate, comma-separated, "
        "repeatable (localhost, 127.0.0.1 and ::1 are always in)",
    )
    p.add_argument("--days", type=checked(int, positive), default=365, help="validity")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.add_argument(
        "--api-keys",
        action="store_true",
        help="also write OUT/api-keys with a fresh client and admin key "
        "(and each key alone in api-keys.client, api-keys.admin)",
    )


def run_certs(a: argparse.Namespace) -> int:
    from client.certs import make_api_keys, make_certs, split_hosts

    target = os.path.join(a.out, "api-keys")
    if a.api_keys and os.path.exists(target) and not a.force:
        raise ValueError(f"{target} already exists (--force replaces it)")
    paths = make_certs(a.out, hosts=split_hosts(a.hosts), days=a.days, force=a.force)
    for path in paths.values():
        print(path)
    if a.api_keys:
        make_api_keys(target)
        print(target)
    return 0
