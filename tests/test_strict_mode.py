"""The strict mode (tests/conftest.py `require_or_skip`): a test that cannot run its part skips,
saying why, unless LLAMADIST_REQUIRE names the part; then the run fails. Checked on a generated
test file run by pytest in a subprocess, once under each setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import pytest_configure

ROOT = Path(__file__).resolve().parent.parent

SKIPPING = """
from tests.conftest import require_or_skip


def test_needs_netns():
    require_or_skip("netns", "netns: this machine has no lab")


def test_needs_compose():
    require_or_skip("compose", "compose: no dockerd")
"""


def start_pytest(directory: Path, required: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LLAMADIST_REQUIRE", None)
    if required is not None:
        env["LLAMADIST_REQUIRE"] = required
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "tests.conftest"]
        + ["-p", "no:cacheprovider", "test_generated.py"],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_required_part_that_skips_fails_the_run(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this directory is the rootdir
    (tmp_path / "test_generated.py").write_text(SKIPPING)
    # Both at once: each imports torch and transformers (tests.conftest) for several seconds.
    runs = {req: start_pytest(tmp_path, req) for req in (None, "compile,netns")}
    outs = {req: run.communicate(timeout=300)[0] for req, run in runs.items()}

    relaxed = outs[None]  # nothing required: skips, their reasons in the summary
    assert runs[None].returncode == 0, relaxed
    assert "2 skipped" in relaxed, relaxed
    assert "netns: this machine has no lab" in relaxed and "compose: no dockerd" in relaxed
    strict = outs["compile,netns"]  # netns required: its skip fails; compose still skips
    assert runs["compile,netns"].returncode == 1, strict
    assert "1 failed, 1 skipped" in strict, strict
    assert "netns: this machine has no lab (LLAMADIST_REQUIRE names 'netns'" in strict, strict
    assert "SKIPPED" in strict and "compose: no dockerd" in strict, strict


def test_an_unknown_part_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("LLAMADIST_REQUIRE", "netns,complie")
    with pytest.raises(pytest.UsageError, match="complie"):
        pytest_configure(None)
    monkeypatch.setenv("LLAMADIST_REQUIRE", " netns , compose,compile,")
    pytest_configure(None)
