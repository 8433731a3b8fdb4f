"""The `llamadist` command line end to end: real processes on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import reference_greedy

LLAMADIST = str(Path(sys.executable).parent / "llamadist")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([LLAMADIST, *args], capture_output=True, text=True, timeout=timeout)


def test_unreachable_server_is_one_line_and_non_zero():
    for args in (
        ["generate", "--server", "127.0.0.1:1", "hi"],
        ["plan", "show", "--server", "127.0.0.1:1"],
    ):
        out = run_cli(*args)
        assert out.returncode == 1
        assert out.stderr.strip().count("\n") == 0 and "UNAVAILABLE" in out.stderr
        assert "Traceback" not in out.stderr


def test_bad_stage_address_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model directory as far as flags can tell
    out = run_cli("orchestrator", "--stages", "nohostport", "--model", str(tmp_path))
    assert out.returncode == 2 and "not host:port" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_up_generate_plan_and_shutdown(default_model):
    up = subprocess.Popen(
        [
            LLAMADIST,
            "up",
            "--stages",
            "2",
            "--port",
            "0",
            "--http-port",
            "0",
            "--model",
            str(default_model),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = http_url = None
        deadline = time.monotonic() + 180
        while address is None and time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "llamadist up exited before it was ready"
            if "OpenAI-compatible API:" in line:
                http_url = line.split()[2]
            if "mesh ready" in line:
                address = line.rsplit(" ", 1)[1].strip()
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) == 3

        prompt = "What is the capital of France?"
        greedy_24 = ("generate", "--server", address, "--json", "--max-new-tokens", "24",
                     "--ignore-eos", prompt)  # fmt: skip
        out = run_cli(*greedy_24)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(default_model))(prompt)["input_ids"]
        assert result["token_ids"] == reference_greedy(default_model, ids, 24)
        assert result["finish_reason"] == "length"
        timings = result["timings"]
        assert timings["decode_tokens_per_s"] > 0 and len(timings["stages"]) == 2

        streamed = run_cli("generate", "--server", address, "--chat", prompt)
        assert streamed.returncode == 0 and "Paris" in streamed.stdout

        from openai import OpenAI  # up prints the HTTP API's URL; it answers the same

        http = OpenAI(base_url=http_url, api_key="unused", max_retries=0)
        chat = http.chat.completions.create(
            model=default_model.name, messages=[{"role": "user", "content": prompt}],
            temperature=0, max_tokens=24,
        )  # fmt: skip
        assert "Paris" in chat.choices[0].message.content

        table = run_cli("plan", "show", "--server", address)
        assert table.returncode == 0, table.stderr
        rows = table.stdout.strip().splitlines()
        assert rows[1].split()[:4] == ["stage", "address", "device", "layers"]
        assert [r.split()[3] for r in rows[2:]] == ["0-14", "15-29"]

        preview = run_cli("plan", "preview", "--server", address, "--strategy", "compute", "--json")
        assert preview.returncode == 0, preview.stderr
        layers = [s["layers"] for s in json.loads(preview.stdout)["stages"]]
        assert layers[0].startswith("0-") and layers[-1].endswith("-29")
        reload = run_cli(
            "plan",
            "reload",
            "--server",
            address,
            "--strategy",
            "custom",
            "--boundaries",
            "0-9,10-29",
            "--json",
        )
        assert reload.returncode == 0, reload.stderr
        assert json.loads(reload.stdout)["epoch"] == 2
        shown = json.loads(run_cli("plan", "show", "--server", address, "--json").stdout)
        assert [s["layers"] for s in shown["stages"]] == ["0-9", "10-29"]
        again = run_cli(*greedy_24)
        assert json.loads(again.stdout)["token_ids"] == result["token_ids"]
        infeasible = run_cli(
            "plan", "reload", "--server", address, "--strategy", "memory", "--max-memory", "1MB"
        )
        assert infeasible.returncode == 1 and "INVALID_ARGUMENT" in infeasible.stderr

        bad = run_cli("generate", "--server", address, "--json", "--max-new-tokens", "9000", "hi")
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "8192" in bad.stderr

        chat = subprocess.run(
            [LLAMADIST, "chat", "--server", address, "--max-new-tokens", "16"],
            input="What is the capital of France?\nAnd of Italy?\n\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert chat.returncode == 0 and chat.stdout.count("assistant>") == 2
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
