"""Per-stage submodels: a model directory cut into one directory per layer range (`llamadist
model split`), each holding only its own tensors, so a stage host needs only its layers.

A submodel's config.json is the full model's plus a `llamadist_submodel` record: the full
model's fingerprint (what the stage reports, so the orchestrator sees one model), the layer range
it holds, the name of the tensor its head reads, and a digest of its own files. A stage opening a
submodel checks that its tensors are exactly the range's and that its files still match the
digest; either failing is refused with a message that says which. No torch here but in
`split` (the orchestrator imports this module).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from protos.errors import FailedPrecondition, InvalidArgument
from protos.shared.layer_range import LayerRange
from protos.shared.model_files import (
    EMBED,
    HEAD,
    NORM,
    LlamaArgs,
    TensorIndex,
    layer_tensor,
    model_fingerprint,
    read_config,
)

RECORD = "llamadist_submodel"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "generation_config.json",
)  # fmt: skip


@dataclass(frozen=True)
class Held:
    """The layers a model directory holds: all of them, or a submodel's range."""

    layers: LayerRange
    num_layers: int
    fingerprint: str  # the full model's

    def missing(self, start: int, end: int) -> list[int]:
        """The layers of [start, end) this directory lacks."""
        return self.layers.missing(LayerRange(start, end))


def describe(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None


def head_tensor(args: LlamaArgs, index: TensorIndex) -> str:
    """The tensor the head reads: the embedding when config.json ties them, else lm_head
    (weights.load_range refuses an untied checkpoint without one)."""
    return EMBED if args.tie_word_embeddings else HEAD


def range_tensors(index: TensorIndex, start: int, end: int, num_layers: int, head: str):
    """The tensor names a stage serving [start, end) reads, from a full model's index."""
    names = {n for n in index.shapes if (i := layer_of(n)) is not None and start <= i < end}
    if start == 0:
        names.add(EMBED)
    if end == num_layers:
        names |= {NORM, head}
    return sorted(names)


def _digest(model_dir: Path) -> str:
    config = read_config(model_dir)
    config.pop(RECORD, None)
    return model_fingerprint(model_dir, config)


def held(model_dir: Path) -> Held:
    """What `model_dir` holds; a submodel is checked first (see the module's doc)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    args = LlamaArgs.from_config(config)
    record = config.get(RECORD)
    if record is None:
        return Held(LayerRange(0, args.num_layers), args.num_layers, model_fingerprint(model_dir))
    try:
        start, end = int(record["layer_start"]), int(record["layer_end"])
        fingerprint, digest = str(record["model_fingerprint"]), str(record["files_digest"])
        head, per_layer = str(record["head"]), [str(s) for s in record["layer_tensors"]]
    except (KeyError, TypeError, ValueError) as err:
        raise FailedPrecondition(
            f"{model_dir}: config.json's {RECORD} is incomplete ({err!r}): split the model again"
        ) from None
    if not 0 <= start < end <= args.num_layers:
        raise FailedPrecondition(
            f"{model_dir}: its range {start}-{end - 1} is not inside the model's "
            f"{args.num_layers} layers"
        )
    expected = {layer_tensor(i, s) for i in range(start, end) for s in per_layer}
    expected |= {EMBED} if start == 0 else set()
    expected |= {NORM, head} if end == args.num_layers else set()
    present = set(TensorIndex(model_dir).shapes)
    lacking, extra = sorted(expected - present), sorted(present - expected)
    if lacking or extra:
        problems = [f"missing {_few(lacking)}"] * bool(lacking) + [f"extra {_few(extra)}"] * bool(
            extra
        )
        raise FailedPrecondition(
            f"{model_dir}: its tensors do not match its config (layers {start}-{end - 1}): "
            + "; ".join(problems)
        )
    if _digest(model_dir) != digest:
        raise FailedPrecondition(
            f"{model_dir}: its files changed since `llamadist model split` wrote them (they "
            f"do not match the digest in config.json's {RECORD}): split the model again"
        )
    return Held(LayerRange(start, end), args.num_layers, fingerprint)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def split(model_dir: Path, out: Path, ranges: list[tuple[int, int]]) -> list[Path]:
    """Writes OUT/stage-<i> per range: its tensors, config.json with the record, the tokenizer
    in stage 0. Returns the directories. (The orchestrator still reads the full model.)"""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir, out = Path(model_dir), Path(out)
    config = read_config(model_dir)
    if RECORD in config:
        raise InvalidArgument(f"{model_dir} is a submodel already: split the full model")
    args = LlamaArgs.from_config(config)
    check_ranges(ranges, args.num_layers)
    fingerprint = model_fingerprint(model_dir)
    index = TensorIndex(model_dir)
    head = head_tensor(args, index)
    per_layer = sorted({n.split(".", 3)[3] for n in index.shapes if layer_of(n) is not None})
    out.mkdir(parents=True, exist_ok=True)
    dirs = []
    for i, (start, end) in enumerate(ranges):
        target = out / f"stage-{i}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        names = range_tensors(index, start, end, args.num_layers, head)
        tensors = {}
        for path, in_file in index.by_file(names).items():
            with safe_open(str(path), framework="pt") as f:
                for name in in_file:
                    tensors[name] = f.get_tensor(name).contiguous()
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        (target / "config.json").write_text(json.dumps(config, indent=2))
        if i == 0:
            copy_tokenizer(model_dir, target)
        record = {
            "model_fingerprint": fingerprint, "layer_start": start, "layer_end": end,
            "head": head, "layer_tensors": per_layer, "files_digest": _digest(target),
        }  # fmt: skip
        (target / "config.json").write_text(json.dumps({**config, RECORD: record}, indent=2))
        dirs.append(target)
    return dirs


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def check_ranges(ranges: list[tuple[int, int]], num_layers: int) -> None:
    at = 0
    for start, end in ranges:
        if start != at or end <= start:
            break
        at = end
    else:
        if ranges and at == num_layers:
            return
    raise InvalidArgument(
        f"the ranges must cover layers 0-{num_layers - 1} in order, without gaps or overlaps: "
        + ", ".join(f"{a}-{b - 1}" for a, b in ranges)
    )
