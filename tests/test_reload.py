"""Live plan reloads over real gRPC: sessions in flight survive with identical greedy output,
requests arriving meanwhile wait, infeasible specs change nothing."""

from __future__ import annotations

import threading

import pytest

from client.client import ClientError
from tests.conftest import (
    in_process_mesh,
    make_tiny_model,
    orchestrator_stage_key,
    reference_greedy,
)

PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("reload"), "untied_mha")  # 6 layers


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_greedy(model_dir, PROMPT, 200)


def layers_held(mesh) -> list[tuple[int, int]]:
    return [(s.info().get("layer_start", 0), s.info().get("layer_end", 0)) for s in mesh.stages]


def test_reload_from_2_uniform_to_3_custom_mid_stream_keeps_greedy_output(model_dir, expected):
    with in_process_mesh(model_dir, 3, plan_stages=2) as mesh:
        assert layers_held(mesh) == [(0, 3), (3, 6), (0, 0)]
        stream = mesh.client.stream(token_ids=PROMPT, max_new_tokens=200)
        pieces = [next(stream)]
        plan = mesh.client.reload_plan(
            strategy="custom", boundaries="0-1,2-3,4-5", stages=mesh.addresses
        )
        pieces += list(stream)
        assert [t for p in pieces for t in p.token_ids] == expected
        assert pieces[-1].timings["replays"] >= 1  # the reload happened mid-generation
        assert plan["epoch"] == "2" and plan["strategy"] == "custom"
        assert layers_held(mesh) == [(0, 2), (2, 4), (4, 6)]
        assert len(pieces[-1].timings["stages"]) == 3

        # and back to 2 stages: the one left out drops its layers
        back = mesh.client.reload_plan(strategy="uniform", stages=mesh.addresses[1:])
        assert [s["address"] for s in back["stages"]] == mesh.addresses[1:]
        assert layers_held(mesh) == [(0, 0), (0, 3), (3, 6)]
        assert mesh.client.generate(token_ids=PROMPT, max_new_tokens=50).token_ids == expected[:50]


def test_requests_during_reloads_wait_and_stay_exact(model_dir, expected):
    with in_process_mesh(model_dir, 3) as mesh:
        results, errors = {}, []

        def generate(i):
            try:
                results[i] = mesh.client.generate(token_ids=PROMPT, max_new_tokens=120).token_ids
            except ClientError as err:  # pragma: no cover - reported by the assertion below
                errors.append(err)

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for boundaries in ("0-0,1-4,5-5", "0-2,3-3,4-5", "0-1,2-3,4-5"):
            mesh.client.reload_plan(strategy="custom", boundaries=boundaries)
        for t in threads:
            t.join()
        assert errors == []
        assert all(r == expected[:120] for r in results.values()) and len(results) == 6
        assert mesh.client.plan()["epoch"] == "4"


def test_preview_and_infeasible_reloads_change_nothing(model_dir):
    with in_process_mesh(model_dir, 2) as mesh:
        before = mesh.client.plan()
        preview = mesh.client.preview_plan(strategy="custom", boundaries="0-4,5-5")
        assert [(s["layer_start"], s["layer_end"]) for s in preview["stages"]] == [(0, 5), (5, 6)]
        for spec, needle in [
            (dict(strategy="memory", max_memory="1KB"), "bytes more than its limit of 1,000"),
            (dict(strategy="custom", boundaries="0-2,4-5"), "layer"),
            (dict(strategy="custom", boundaries="0-5"), "stage"),
            (dict(strategy="fastest"), "choose one of"),
        ]:
            with pytest.raises(ClientError) as err:
                mesh.client.reload_plan(**spec)
            assert err.value.code == "INVALID_ARGUMENT" and needle in err.value.message, err.value
        a, b = mesh.addresses
        for stages, needle in [
            ([a, " + "], "stage position 1 names no address"),
            ([a, f"{b}+{a}"], "named twice"),
        ]:
            with pytest.raises(ClientError) as err:
                mesh.client.preview_plan(strategy="uniform", stages=stages)
            assert err.value.code == "INVALID_ARGUMENT" and needle in err.value.message, err.value
        with pytest.raises(ClientError) as err:
            mesh.client.reload_plan(strategy="uniform", stages=["127.0.0.1:1"])
        assert err.value.code == "UNAVAILABLE" and "127.0.0.1:1" in err.value.message
        assert mesh.client.plan() == before
        assert layers_held(mesh) == [(0, 3), (3, 6)]


def test_plan_reports_estimates_from_live_capacities(model_dir):
    with in_process_mesh(model_dir, 2) as mesh:
        plan = mesh.client.plan()
        for stage in plan["stages"]:
            assert stage["device"] == "cpu"
            assert int(stage["weight_bytes"]) > 0 and int(stage["kv_capacity_tokens"]) > 0
            assert stage["est_ms_per_token"] > 0
        compute = mesh.client.preview_plan(strategy="compute")
        assert sum(s["layer_end"] - s["layer_start"] for s in compute["stages"]) == 6


def test_seeded_sampling_survives_a_reload_mid_stream(model_dir):
    """Each sampled token is a function of (seed, position): a reload replays the session from
    position 0 and the tokens after it are those of an uninterrupted run with the same seed."""
    sampling = dict(temperature=0.8, top_k=40, seed=1234, repetition_penalty=1.3)
    with in_process_mesh(model_dir, 3, plan_stages=2) as mesh:
        expected = mesh.client.generate(token_ids=PROMPT, max_new_tokens=40, **sampling).token_ids
        stream = mesh.client.stream(token_ids=PROMPT, max_new_tokens=40, **sampling)
        pieces = [next(stream) for _ in range(8)]
        mesh.client.reload_plan(strategy="custom", boundaries="0-1,2-3,4-5", stages=mesh.addresses)
        pieces += list(stream)
    assert pieces[-1].timings["replays"] >= 1
    assert [t for p in pieces for t in p.token_ids] == expected


def test_a_restarted_orchestrator_plans_above_the_epochs_its_stages_hold(model_dir, expected):
    from orchestrator.config import OrchestratorConfig
    from orchestrator.server import build_server

    with in_process_mesh(model_dir, 2) as mesh:
        mesh.client.reload_plan(strategy="custom", boundaries="0-1,2-5")
        mesh.client.reload_plan(strategy="uniform")
        assert mesh.client.plan()["epoch"] == "3"
        config = OrchestratorConfig(
            model=str(model_dir),
            stages=tuple(mesh.addresses),
            port=0,
            stage_wait_s=10,
            **orchestrator_stage_key(),
        )
        server, port, second = build_server(config)
        server.start()
        second.start()
        try:
            assert second.ready() == (True, "") and second.view.plan.epoch == 4
            from client.client import Client

            with Client(f"127.0.0.1:{port}", timeout_s=60) as client:
                assert (
                    client.generate(token_ids=PROMPT, max_new_tokens=20).token_ids
                    == (expected[:20])
                )
        finally:
            server.stop(0)
            second.close()
