"""A stage moved to a newer plan epoch by someone else (an admin's LoadLayers, a second
orchestrator) gets its layers back from the orchestrator, as a restarted one does: the
orchestrator re-assigns its plan at an epoch above the foreign one, and sessions replay onto it.
Real gRPC servers in process; the foreign assignment is sent to the stage directly."""

from __future__ import annotations

import time

import pytest

from client.client import ClientError
from orchestrator.stage_client import StageClient
from protos.shared.stage_auth import load_stage_key
from tests.conftest import in_process_mesh, make_tiny_model, reference_greedy, stage_key_file

PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]
RECOVERY_S = 15.0  # the prober's first tries come within a second; this is slack for a busy CPU


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("epochs"), "untied_mha")  # 6 layers


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_greedy(model_dir, PROMPT, 120)


def take_over(address: str, epoch: int, layers: tuple[int, int] | None) -> None:
    """What an outsider with access to the stage (it holds the stage key: an admin, a second
    orchestrator) does: LoadLayers under its own epoch."""
    outsider = StageClient(address, 0, stage_key=load_stage_key(stage_key_file()))
    try:
        if layers is None:
            outsider.drop_layers(epoch)
        else:
            outsider.load_layers(*layers, epoch)
    finally:
        outsider.close()


def generate_once_back(mesh, new_tokens: int, **kwargs) -> list[int]:
    """Retries UNAVAILABLE (no live replica while the stage is down) for up to RECOVERY_S."""
    deadline = time.monotonic() + RECOVERY_S
    while True:
        try:
            return mesh.client.generate(token_ids=PROMPT, max_new_tokens=new_tokens, **kwargs)
        except ClientError as err:
            assert err.code == "UNAVAILABLE", err
            assert time.monotonic() < deadline, f"not back after {RECOVERY_S} s: {err}"
            time.sleep(0.2)


def held(stage) -> tuple[int, int, int]:
    info = stage.info()
    return info["plan_epoch"], info.get("layer_start", 0), info.get("layer_end", 0)


@pytest.mark.parametrize(
    "foreign_jump, foreign_layers",
    [(1, None), (1000, (3, 5))],  # (3, 5): a range the fetching stage has the weights of
    ids=["holds-nothing-next-epoch", "other-range-far-epoch"],
)
@pytest.mark.parametrize("fetches", [False, True], ids=["own-weights", "fetch-weights"])
def test_a_stage_taken_over_gets_its_layers_back(
    model_dir, tmp_path, expected, fetches, foreign_jump, foreign_layers
):
    options = {}
    if fetches:  # stage 1 has no model directory: the orchestrator ships its tensors
        options = dict(
            stage_models=[model_dir, ""],
            stage_options_per_stage=[
                {},
                dict(fetch_weights=True, weights_cache=str(tmp_path / "cache")),
            ],
        )
    with in_process_mesh(model_dir, 2, **options) as mesh:
        assert mesh.client.generate(token_ids=PROMPT, max_new_tokens=30).token_ids == expected[:30]
        epoch = int(mesh.client.plan()["epoch"])
        foreign = epoch + foreign_jump
        take_over(mesh.addresses[1], foreign, foreign_layers)
        assert held(mesh.stages[1])[0] == foreign

        again = generate_once_back(mesh, 30)
        assert again.token_ids == expected[:30]
        # the plan went above the foreign epoch, and every stage holds its range under it
        now = int(mesh.client.plan()["epoch"])
        assert now == foreign + 1
        assert [held(s) for s in mesh.stages] == [(now, 0, 3), (now, 3, 6)]


def test_a_replica_taken_over_mid_stream_rejoins_and_the_stream_is_unchanged(model_dir, expected):
    with in_process_mesh(model_dir, 3) as mesh:
        a, b, c = mesh.addresses
        plan = mesh.client.reload_plan(strategy="uniform", stages=[a, f"{b}+{c}"])
        epoch = int(plan["epoch"])
        stream = mesh.client.stream(token_ids=PROMPT, max_new_tokens=120)
        pieces = [next(stream) for _ in range(10)]
        serving = [i for i in (1, 2) if mesh.stages[i].info().get("active_sessions", 0)]
        assert len(serving) == 1
        victim = serving[0]
        take_over(mesh.addresses[victim], epoch + 1, None)
        pieces += list(stream)  # fails over to the other replica; the client sees nothing
        assert [t for p in pieces for t in p.token_ids] == expected
        assert pieces[-1].timings["replays"] >= 1

        deadline = time.monotonic() + RECOVERY_S
        while held(mesh.stages[victim])[1:] != (3, 6):
            assert time.monotonic() < deadline, (
                f"the taken-over replica holds {held(mesh.stages[victim])} after {RECOVERY_S} s"
            )
            time.sleep(0.1)
        now = int(mesh.client.plan()["epoch"])
        assert now > epoch + 1
        assert [held(s)[0] for s in mesh.stages] == [now] * 3
        assert mesh.client.generate(token_ids=PROMPT, max_new_tokens=30).token_ids == expected[:30]
