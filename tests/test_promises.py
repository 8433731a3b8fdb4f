"""README promises checked over real gRPC, in-process: the orchestrator refuses a stage that
serves another model, naming it; a message over the 256 MiB limit is refused and the services go
on serving; an idle session leaves a stage after --session-ttl-s; the timings of
`llamadist generate --json` add up."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from client.cli import main
from client.client import Client, ClientError
from orchestrator.config import OrchestratorConfig
from orchestrator.orchestrator import Orchestrator
from orchestrator.server import build_server as build_orchestrator
from orchestrator.tokenizer import Tokenizer
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.limits import MAX_MESSAGE_BYTES
from stage_service.config import StageConfig
from stage_service.server import build_server as build_stage
from stage_service.stage import Stage
from tests.conftest import (
    in_process_mesh,
    keyed_channel,
    keyed_metadata,
    make_tiny_model,
    make_tokenizer_model,
    orchestrator_stage_key,
    stage_key,
)

PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]
SAME_MODEL = "give every service the same --model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("promises"), "gqa")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("promises-other"), "untied_mha")


# ---------------------------------------------------------------------- one model everywhere


@dataclass
class Started:
    client: Client
    orchestrator: Orchestrator
    stage: Stage
    stage_address: str


@contextmanager
def orchestrator_over_a_stage_of(model_dir: Path, stage_model: Path) -> Iterator[Started]:
    """An orchestrator for `model_dir` whose one stage serves `stage_model`, after its start-up
    (which returns once it has failed or applied its plan)."""
    stage_server, stage_port, stage = build_stage(
        StageConfig(model=str(stage_model), **stage_key())
    )
    stage_server.start()
    address = f"127.0.0.1:{stage_port}"
    config = OrchestratorConfig(
        model=str(model_dir), port=0, stages=(address,), stage_wait_s=10, **orchestrator_stage_key()
    )
    server, port, orchestrator = build_orchestrator(config)
    server.start()
    try:
        orchestrator.start()
        with Client(f"127.0.0.1:{port}", timeout_s=10) as client:
            yield Started(client, orchestrator, stage, address)
    finally:
        server.stop(0)
        orchestrator.close()
        stage_server.stop(0)


def test_a_stage_serving_another_model_keeps_the_orchestrator_from_starting(model_dir, other_model):
    with orchestrator_over_a_stage_of(model_dir, other_model) as started:
        ready, detail = started.client.health()
        assert not ready and detail.startswith("start-up failed")
        stage = started.stage
        assert f"stage 0 ({started.stage_address}) serves model {stage.fingerprint}" in detail
        assert started.orchestrator.fingerprint in detail and SAME_MODEL in detail
        with pytest.raises(ClientError) as err:
            started.client.generate(token_ids=PROMPT, max_new_tokens=2)
        assert err.value.code == "UNAVAILABLE" and SAME_MODEL in err.value.message
        assert stage.loaded is None and stage.epoch == 0  # it was given no layers


def test_a_stage_serving_other_weights_of_the_same_architecture_is_refused(model_dir, tmp_path):
    other_weights = make_tiny_model(tmp_path, "gqa", seed=1)  # model_dir is "gqa", seed 0
    with orchestrator_over_a_stage_of(model_dir, other_weights) as started:
        ready, detail = started.client.health()
        assert not ready and SAME_MODEL in detail


def test_a_reload_onto_a_stage_serving_another_model_is_refused(model_dir, other_model):
    stage_server, stage_port, stage = build_stage(
        StageConfig(model=str(other_model), **stage_key())
    )
    stage_server.start()
    stranger = f"127.0.0.1:{stage_port}"
    try:
        with in_process_mesh(model_dir, 2) as mesh:
            before = mesh.client.plan()
            with pytest.raises(ClientError) as err:
                mesh.client.reload_plan(strategy="uniform", stages=[mesh.addresses[0], stranger])
            assert err.value.code == "FAILED_PRECONDITION"
            assert f"stage 1 ({stranger})" in err.value.message and SAME_MODEL in err.value.message
            assert mesh.client.plan() == before and stage.loaded is None
            assert mesh.client.generate(token_ids=PROMPT, max_new_tokens=3).token_ids
    finally:
        stage_server.stop(0)


# ---------------------------------------------------------------------- message size


def oversized_message() -> bytes:
    """A message whose field 1 (GenerateRequest.prompt, StepRequest.session_id, StepBatch.steps)
    holds 1 byte more than the limit: one bytes object, its header padded with zeros."""
    n = MAX_MESSAGE_BYTES + 1
    header = bytearray(b"\x0a")
    while n >= 0x80:
        header.append(n & 0x7F | 0x80)
        n >>= 7
    header.append(n)
    return bytes(header).ljust(len(header) + MAX_MESSAGE_BYTES + 1, b"\0")


def assert_refused_for_size(err: grpc.RpcError) -> None:
    """gRPC's own limit (RESOURCE_EXHAUSTED), or ours naming it (INVALID_ARGUMENT)."""
    code, details = err.code(), err.details() or ""
    assert (code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details) or (
        code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in details
    ), (code, details[:200])


def test_a_message_over_256_mib_is_refused_and_others_are_still_served(model_dir):
    unlimited = [("grpc.max_send_message_length", -1)]  # the client side must not refuse it
    with in_process_mesh(model_dir, 2) as mesh:
        stream = mesh.client.stream(token_ids=PROMPT, max_new_tokens=24)
        first = next(stream)  # a generation in flight meanwhile
        big = oversized_message()
        with grpc.insecure_channel(mesh.address, options=unlimited) as channel:
            generate = channel.unary_unary("/llamadist.Orchestrator/Generate")
            with pytest.raises(grpc.RpcError) as err:
                generate(big, timeout=30)  # a GenerateRequest
            assert_refused_for_size(err.value)
        with grpc.insecure_channel(mesh.addresses[1], options=unlimited) as channel:
            forward = channel.unary_unary("/llamadist.Stage/Forward")
            with pytest.raises(grpc.RpcError) as err:
                forward(big, timeout=30, metadata=keyed_metadata())  # a StepRequest
            assert_refused_for_size(err.value)
            forward_stream = channel.stream_stream("/llamadist.Stage/ForwardStream")
            with pytest.raises(grpc.RpcError) as err:
                batch = forward_stream(iter([big]), timeout=30, metadata=keyed_metadata())
                list(batch)  # a StepBatch, on the data path
            assert_refused_for_size(err.value)
        del big
        rest = [t for piece in stream for t in piece.token_ids]
        again = mesh.client.generate(token_ids=PROMPT, max_new_tokens=24).token_ids
        assert first.token_ids + rest == again and len(again) == 24


# ---------------------------------------------------------------------- idle sessions


def test_idle_sessions_leave_a_running_stage_after_the_ttl(model_dir):
    """Stage-level steps that nobody ends, as an orchestrator that died would leave them (one
    that lives frees the sessions of abandoned streams itself: tests/test_admission.py)."""
    with in_process_mesh(model_dir, 2, stage_options=dict(session_ttl_s=1)) as mesh:
        epoch = mesh.orchestrator.router.plan.epoch
        first = pb_grpc.StageStub(keyed_channel(mesh.addresses[0]))

        def step(session_id: str, start_pos: int, tokens: list[int]) -> None:
            request = pb.StepRequest(
                session_id=session_id, plan_epoch=epoch, start_pos=start_pos, token_ids=tokens
            )
            first.Forward(request, timeout=10)

        def info() -> pb.StageInfo:
            return first.Info(pb.InfoRequest(), timeout=10)

        step("idle", 0, PROMPT)  # a stage-level step nobody ends
        step("busy", 0, PROMPT)
        assert info().active_sessions == 2 and info().kv_used_bytes > 0
        t0 = time.monotonic()
        position = len(PROMPT)
        while time.monotonic() - t0 < 1.5:  # "busy" keeps stepping, "idle" does not
            time.sleep(0.25)
            step("busy", position, [1])
            position += 1
        assert info().active_sessions == 1  # "idle" expired, "busy" is live: never evicted
        with pytest.raises(grpc.RpcError) as err:
            step("idle", len(PROMPT), [1])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # the service goes on serving while sessions expire
        assert len(mesh.client.generate(token_ids=PROMPT, max_new_tokens=4).token_ids) == 4
        deadline = time.monotonic() + 5
        while info().active_sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        now = info()
        assert now.active_sessions == 0 and now.kv_used_bytes == 0


# ---------------------------------------------------------------------- generate --json


def test_generate_json_timings_add_up(default_model, tmp_path, capsys):
    model_dir = make_tokenizer_model(tmp_path / "tokenizer", default_model)
    prompt, tokens = "Once upon a time", 12
    with in_process_mesh(model_dir, 2) as mesh:
        # one step per token: speculation off (a verify step carries several tokens)
        argv = ["generate", "--server", mesh.address, "--json", "--ignore-eos", "--speculate"]
        code = main([*argv, "off", "--max-new-tokens", str(tokens), prompt])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1, out
    reply = json.loads(out[0])
    tokenizer = Tokenizer(model_dir)
    assert reply["finish_reason"] == "length" and len(reply["token_ids"]) == tokens
    assert reply["prompt_tokens"] == len(tokenizer.encode(prompt, 10**6))
    assert reply["text"] == tokenizer.decode(reply["token_ids"])
    t = reply["timings"]
    decode_ms = (tokens - 1) / t["decode_tokens_per_s"] * 1e3
    assert t["ttft_ms"] > 0 and decode_ms > 0
    assert t["total_ms"] >= t["ttft_ms"] + decode_ms - 0.01  # within rounding
    assert t["total_ms"] <= t["ttft_ms"] + decode_ms + 5  # and nothing much besides
    assert [s["address"] for s in t["stages"]] == mesh.addresses
    assert all(0 < s["compute_ms"] <= t["total_ms"] for s in t["stages"])
    assert sum(s["compute_ms"] for s in t["stages"]) <= t["total_ms"]  # one session: in turn
    assert all(s["steps"] == tokens for s in t["stages"])
    assert t["hop_overhead_ms"] >= 0 and t["replays"] == 0
