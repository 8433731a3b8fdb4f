"""Every `llamadist` command, given a missing model, a bad address, a malformed flag or an
unreadable file, fails with exactly one line on stderr, no traceback and a non-zero exit code,
and fast. Most run in this process through `main(argv)`; a few run as real processes to show
that neither logging nor a traceback leaks.

Tests run as root, which reads a file of mode 000, so "unreadable" is a directory or a path
that does not exist."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.mesh import main as bench_main
from client.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "127.0.0.1:1"  # nothing listens there: refused at once


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli-errors")
    fake = root / "model"  # passes the flag checks; nothing starts on it in these tests
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    empty = root / "empty"
    empty.mkdir()
    a_file = root / "a-file"
    a_file.write_text("x")
    return {
        "model": str(fake),
        "no_config": str(empty),  # a directory without config.json (like /tmp)
        "folder": str(empty),  # a directory where a file is wanted
        "under_a_file": str(a_file / "sub"),  # no one can create this, root included
        "a_file": str(a_file),  # a readable file, but not a certificate
    }


CASES = {
    # model
    "fetch-default into a path under a file": "model fetch-default --dir {under_a_file}",
    "model without subcommand": "model",
    # stage
    "stage missing model": "stage --model /nonexistent",
    "stage model without config.json": "stage --model {no_config}",
    "stage /tmp as model": "stage --model /tmp",
    "stage port 99999": "stage --model {model} --port 99999",
    "stage empty host": "stage --model {model} --host ''",
    "stage kv-cache-mb abc": "stage --model {model} --kv-cache-mb abc",
    "stage kv-cache-mb 0": "stage --model {model} --kv-cache-mb 0",
    "stage unknown dtype": "stage --model {model} --dtype float64",
    "stage unknown device": "stage --model {model} --device gpu",
    "stage missing certificate": "stage --model {model} --tls-cert /nonexistent.pem",
    "stage certificate is a folder": "stage --model {model} --tls-cert {folder}",
    "stage half the TLS files": "stage --model {model} --tls-cert {a_file}",
    "stage unknown flag": "stage --model {model} --no-such-flag",
    # orchestrator
    "orchestrator missing model": "orchestrator --model /nonexistent --stages a:1",
    "orchestrator /tmp as model": "orchestrator --model /tmp --stages a:1",
    "orchestrator bad stages": "orchestrator --model {model} --stages bad",
    "orchestrator stage port": "orchestrator --model {model} --stages a:1,b:99999",
    "orchestrator no stages": "orchestrator --model {model}",
    "orchestrator port 99999": "orchestrator --model {model} --stages a:1 --port 99999",
    "orchestrator empty host": "orchestrator --model {model} --stages a:1 --host ''",
    "orchestrator unknown strategy": "orchestrator --model {model} --stages a:1 --strategy x",
    "orchestrator custom, no boundaries": "orchestrator --model {model} --stages a:1 "
    "--strategy custom",
    "orchestrator bad memory": "orchestrator --model {model} --stages a:1 --max-memory 4G",
    "orchestrator step timeout x": "orchestrator --model {model} --stages a:1 --step-timeout-s x",
    "orchestrator keys file is a folder": "orchestrator --model {model} --stages a:1 "
    "--api-keys-file {folder}",
    "orchestrator keys file missing": "orchestrator --model {model} --stages a:1 "
    "--api-keys-file /nonexistent",
    "orchestrator missing certificate": "orchestrator --model {model} --stages a:1 "
    "--tls-cert /nonexistent.pem",
    # up
    "up missing model": "up --model /nonexistent",
    "up model without config.json": "up --model {no_config}",
    "up port 99999": "up --model {model} --port 99999",
    "up zero stages": "up --model {model} --stages 0",
    "up stages abc": "up --model {model} --stages abc",
    "up missing certificate": "up --model {model} --tls-cert /nonexistent.pem",
    "up keys file is a folder": "up --model {model} --api-keys-file {folder}",
    # certs
    "certs into a path under a file": "certs --out {under_a_file}",
    "certs zero days": "certs --out {folder} --days 0",
    "certs without --out": "certs",
    # generate
    "generate bad address": "generate --server nohost:notaport hi",
    "generate unreachable": f"generate --server {UNREACHABLE} hi",
    "generate unreachable json": f"generate --server {UNREACHABLE} --json hi",
    "generate temperature x": "generate --temperature x hi",
    "generate negative temperature": "generate --temperature -1 hi",
    "generate top-p 2": f"generate --server {UNREACHABLE} --top-p 2 hi",
    "generate zero tokens": "generate --max-new-tokens 0 hi",
    "generate missing CA": "generate --tls-ca /nonexistent.pem hi",
    "generate CA is a folder": "generate --tls-ca {folder} hi",
    "generate without prompt": "generate",
    # chat
    "chat bad address": "chat --server nohost:notaport",
    "chat unreachable": f"chat --server {UNREACHABLE}",
    "chat temperature x": "chat --temperature x",
    # plan
    "plan without subcommand": "plan",
    "plan show unreachable": f"plan show --server {UNREACHABLE}",
    "plan show bad address": "plan show --server nohost:notaport",
    "plan preview unreachable": f"plan preview --server {UNREACHABLE} --strategy compute",
    "plan preview no strategy": f"plan preview --server {UNREACHABLE}",
    "plan preview unknown strategy": "plan preview --strategy fastest",
    "plan reload unreachable": f"plan reload --server {UNREACHABLE} --strategy custom "
    "--boundaries 0-9,10-29",
    "plan reload partitions x": "plan reload --strategy uniform --num-partitions x",
    # health
    "health unreachable": f"health --server {UNREACHABLE}",
    "health stage unreachable": f"health --stage --server {UNREACHABLE}",
    "health bad address": "health --server nohost:notaport",
    # no command
    "no command": "",
    "unknown command": "serve",
}


def argv(name: str, paths: dict[str, str]) -> list[str]:
    return shlex.split(CASES[name].format(**paths))


def assert_one_line(code: int, err: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("llamadist: error: "), lines[0]


@pytest.mark.parametrize("name", CASES)
def test_every_failure_is_one_line_and_non_zero(name, paths, capsys):
    t0 = time.monotonic()
    code = main(argv(name, paths))
    captured = capsys.readouterr()
    assert_one_line(code, captured.err)
    assert time.monotonic() - t0 < 10, f"{name} took {time.monotonic() - t0:.1f} s"


# The benchmark (bench/mesh.py, `make bench`) is no llamadist command, yet fails the same way.
BENCH_CASES = {
    "missing model": "--model /nonexistent --no-transformers",
    "/tmp as model": "--model /tmp --no-transformers",
    "stages abc": "--stages abc",
}


@pytest.mark.parametrize("name", BENCH_CASES)
def test_the_benchmark_fails_in_one_line_too(name, capsys):
    t0 = time.monotonic()
    code = bench_main(shlex.split(BENCH_CASES[name]))
    assert_one_line(code, capsys.readouterr().err)
    assert time.monotonic() - t0 < 10, f"{name} took {time.monotonic() - t0:.1f} s"


def test_usage_errors_exit_2_and_failed_calls_1(paths, capsys):
    assert main(["stage", "--model", paths["model"], "--kv-cache-mb", "abc"]) == 2
    assert main(["stage", "--model", "/nonexistent"]) == 2
    assert main(["generate", "--server", UNREACHABLE, "hi"]) == 1
    err = capsys.readouterr().err
    assert "invalid int value: 'abc'" in err and "UNAVAILABLE" in err


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(
    "name",
    [
        "stage missing model",
        "stage kv-cache-mb abc",
        "orchestrator bad stages",
        "generate unreachable",
        "up missing certificate",
    ],
)
def test_as_a_process_nothing_but_the_line_reaches_stderr(name, paths):
    out = run_cli(*argv(name, paths))
    assert_one_line(out.returncode, out.stderr)
    assert out.stdout == ""


def test_a_service_that_fails_after_its_flags_is_one_line_too(paths):
    """Past the flag checks (a config.json without the model's shape): still one line, from the
    catch-all, with logging configured."""
    out = run_cli("stage", "--model", paths["model"], "--port", "0")
    assert_one_line(out.returncode, out.stderr)
    assert out.returncode == 1
