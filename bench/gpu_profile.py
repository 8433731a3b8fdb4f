"""Where a loaded mesh spends its time (bench/gpu.sh's machine, or any): the 2-stage mesh of
gpu_bench.py under N concurrent sessions, with py-spy recording the orchestrator and both stages
at once while the load runs. py-spy must be importable or on PATH (the device lacks it: carry
its wheel). Writes each process's raw stacks (`<name>.txt`, all threads; `<name>-gil.txt`, only
the thread holding the GIL) and their summaries (bench/spy_summary.py) to $OUT.

    OUT=/tmp/out python3 bench/gpu_profile.py --sessions 64 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import start_mesh, stop  # noqa: E402
from gpu_model import PROMPT, make_model  # noqa: E402
from spy_summary import summary  # noqa: E402


def py_spy() -> list[str]:
    found = shutil.which("py-spy")
    if found:
        return [found]
    for root in os.environ.get("PYTHONPATH", "").split(":"):
        candidate = Path(root) / "bin" / "py-spy"
        if candidate.is_file():
            return [str(candidate)]
    raise SystemExit("py-spy not found: pip install py-spy (or carry its wheel)")


def record(pid: int, out: Path, seconds: int, gil: bool) -> subprocess.Popen:
    cmd = [*py_spy(), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100"]
    cmd += ["--format", "raw", "--output", str(out), "--nonblocking", "--threads"]
    return subprocess.Popen([*cmd, *(["--gil"] if gil else [])], stdout=subprocess.DEVNULL)


def main() -> int:
    from bench.mesh import aggregate
    from client.client import Client

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--seconds", type=int, default=10, help="py-spy's recording time")
    p.add_argument("--tokens", type=int, default=900, help="new tokens per session")
    args = p.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    model = Path("/tmp/llama3-8b-random")
    make_model(model)
    procs: list = []
    try:
        address = start_mesh(model, out, 2, 16000, procs)
        with Client(address, timeout_s=600) as client:
            client.generate(token_ids=PROMPT, max_new_tokens=16, ignore_eos=True)  # warm-up
        aggregate(lambda: Client(address, timeout_s=600), args.sessions, 32, token_ids=PROMPT)
        result: list[float] = []
        load = threading.Thread(
            target=lambda: result.append(
                aggregate(
                    lambda: Client(address, timeout_s=600),
                    args.sessions,
                    args.tokens,
                    token_ids=PROMPT,
                )
            )
        )
        load.start()
        time.sleep(5)  # past the prefills
        spies = []
        for proc in procs:
            for gil in (False, True):
                name = proc.name + ("-gil" if gil else "")
                spies.append((name, record(proc.proc.pid, out / f"{name}.txt", args.seconds, gil)))
        for _, spy in spies:
            spy.wait()
        load.join()
        print(f"{args.sessions} sessions: {result[0]:.0f} tok/s (py-spy running part of it)")
        for name, _ in spies:
            text = summary(out / f"{name}.txt")
            (out / f"{name}-summary.txt").write_text(text)
            print(f"==== {name}\n{text}")
    finally:
        stop(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
