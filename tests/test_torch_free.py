"""The orchestrator and the client run without torch: importing them (in a fresh interpreter, as
their processes do) loads neither torch nor transformers. Only the stages need torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


def heavy_modules_after(code: str) -> list[str]:
    """Runs `code` in a fresh interpreter; the heavy modules it left in sys.modules."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, cwd=ROOT, capture_output=True, text=True
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "module",
    [
        "protos.model_files",
        "orchestrator.orchestrator",
        "orchestrator.server",
        "client",
        "client.cli",
    ],
)
def test_importing_loads_no_torch_and_no_transformers(module):
    assert heavy_modules_after(f"import {module}") == []
