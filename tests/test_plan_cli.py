"""`llamadist plan reload` as an operator runs it: the CLI in its own process against an
in-process mesh (real gRPC on loopback), where one stage is sent weights and another is not."""

from __future__ import annotations

import json

import pytest

from tests.conftest import in_process_mesh, make_tiny_model
from tests.test_cli_e2e import run_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("plan-cli"), "untied_mha")  # 6 layers


def mixed_mesh(model_dir, tmp_path):
    """Stage 0 has no model directory (--fetch-weights), stage 1 holds the whole model."""
    return in_process_mesh(
        model_dir,
        2,
        stage_models=["", model_dir],
        stage_options_per_stage=[
            dict(fetch_weights=True, weights_cache=str(tmp_path / "cache")),
            {},
        ],
    )


@pytest.mark.parametrize("as_json", [False, True])
def test_reload_with_one_stage_fed_and_one_not_reports_success(model_dir, tmp_path, as_json):
    with mixed_mesh(model_dir, tmp_path) as mesh:
        assert mesh.client.plan()["epoch"] == "1"  # uniform: 0-2, 3-5
        out = run_cli(
            "plan", "reload", "--server", mesh.address, "--strategy", "custom",
            "--boundaries", "0-3,4-5", *(["--json"] if as_json else []),
        )  # fmt: skip
        assert out.returncode == 0 and not out.stderr, out.stdout + out.stderr
        assert mesh.client.plan()["epoch"] == "2"
    if as_json:
        stages = json.loads(out.stdout)["stages"]
    else:  # the table: a header, then one row per stage
        lines = out.stdout.splitlines()[1:]
        header = lines[0].split()
        stages = [dict(zip(header, line.split(), strict=True)) for line in lines[1:]]
    assert [s["layers"] for s in stages] == ["0-3", "4-5"]
    # stage 0 was sent layer 3, stage 1 nothing: both rows say so
    fed, unfed = stages
    assert float(fed["fetch_mb"]) > 0 and float(fed["fetch_s"]) >= 0
    assert float(unfed["fetch_mb"]) == 0 and float(unfed["fetch_s"]) == 0
