"""keep_freed_buffers: a serving process's per-step buffers stop faulting in fresh pages."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


def faults_per_message(mode: str) -> float:
    cmd = [sys.executable, "-m", "bench.malloc_probe", "--child", mode, "--messages", "50"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["faults_per_message"]


@glibc
def test_it_sets_glibcs_thresholds():
    code = "from protos.shared.allocator import keep_freed_buffers as k; assert k()"
    subprocess.run([sys.executable, "-c", code], check=True)  # not this test process's malloc


@glibc
def test_a_hops_buffers_reuse_freed_pages():
    default, kept = faults_per_message("default"), faults_per_message("kept")
    # a 64-row message of 4096 bf16 rows is ~2 MiB of buffers: ~500 pages by default
    assert default > 100, f"the default malloc faulted only {default:.0f} pages a message"
    assert kept < default / 10, f"{kept:.0f} page faults a message with the thresholds set"
