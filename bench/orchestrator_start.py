"""How long the orchestrator process takes to start and how much memory it holds.

Per run: one stage process (started first, not measured), then `python -m client.cli
orchestrator ...`, timed from its exec to its "listening" banner; its resident memory (psutil)
once Health says SERVING and again after one short generation. Prints each run and the medians.

Usage (from the repository root, with the venv's python):
  python bench/orchestrator_start.py                 # the default model, 3 runs
  python bench/orchestrator_start.py --tiny          # a tiny random model (no tokenizer files)
  python bench/orchestrator_start.py --code DIR      # the services from another checkout

To measure an older commit: `git worktree add /tmp/llamadist-before <commit>`, copy the
generated protos/*_pb2*.py there, run with `--code /tmp/llamadist-before`, then
`git worktree remove --force /tmp/llamadist-before`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.client import Client  # noqa: E402
from protos.shared.stage_auth import key_env  # noqa: E402

KEY_DIR = tempfile.mkdtemp(prefix="llamadist-bench-key-")

LISTENING = re.compile(r"listening on (\S+:\d+)")


def spawn(code: Path, args: list[str]) -> subprocess.Popen:
    # the stage key through the environment, which the old code ignores and the new one reads
    env = {**os.environ, **key_env(KEY_DIR), "PYTHONPATH": str(code)}
    return subprocess.Popen(
        [sys.executable, "-m", "client.cli", *args],
        cwd=code,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def wait_listening(proc: subprocess.Popen) -> str:
    for line in proc.stdout:
        if match := LISTENING.search(line):
            return match.group(1)
    raise RuntimeError(f"exited with code {proc.wait()} before listening")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_run(code: Path, model: str) -> dict[str, float]:
    stage = spawn(code, ["stage", "--model", model, "--port", "0", "--threads", "1"])
    orch = None
    try:
        stage_address = wait_listening(stage)
        t0 = time.perf_counter()
        orch = spawn(
            code,
            ["orchestrator", "--model", model, "--port", "0", "--stages", stage_address],
        )
        address = wait_listening(orch)
        listening_s = time.perf_counter() - t0
        rss = psutil.Process(orch.pid).memory_info
        with Client(address) as client:
            client.wait_ready(300)
            serving_mb = rss().rss / 2**20
            client.generate(token_ids=[1, 2, 3], max_new_tokens=4, ignore_eos=True)
            generated_mb = rss().rss / 2**20
        return {
            "listening_s": listening_s,
            "rss_serving_mb": serving_mb,
            "rss_after_mb": generated_mb,
        }
    finally:
        for proc in (orch, stage):
            if proc is not None:
                stop(proc)


def tiny_model(out: Path) -> Path:
    """A 2-layer random Llama (config.json + model.safetensors, no tokenizer files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def show(numbers: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in numbers.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model directory (default: the default model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose services are measured")
    parser.add_argument("--runs", type=int, default=3, help="number of runs (medians reported)")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llamadist-tiny-") as tmp:
        if a.tiny:
            model = str(tiny_model(Path(tmp) / "tiny"))
        elif a.model:
            model = a.model
        else:
            from client.default_model import fetch_default

            model = str(fetch_default())
        runs = []
        for i in range(a.runs):
            runs.append(one_run(Path(a.code).resolve(), model))
            print(f"run {i + 1}: {show(runs[-1])}", flush=True)
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median of {a.runs} ({a.code}, {model}): {show(medians)}")


if __name__ == "__main__":
    main()
