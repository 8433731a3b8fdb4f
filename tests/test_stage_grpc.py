"""A real stage server on port 0: the last stage's logits against transformers, every kind of
bad unary input answered with a precise status while other sessions keep being served, and plan
epochs. Streams, routes and step batches: tests/test_stage_streams.py."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from protos import codec
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from stage_service.config import StageConfig
from stage_service.server import build_server
from tests.conftest import reference_model
from tests.stage_servers import OPEN, Link, Stages, hidden_of, status_of


def test_last_stage_logits_match_transformers_over_the_wire(tiny, two_stages):
    ids = [5, 17, 33, 2, 99, 64, 8, 1]
    with torch.inference_mode():
        expected = reference_model(tiny)(torch.tensor([ids])).logits[0]
    prefill = codec.from_pb(two_stages.step("s", 0, ids[:6], return_logits=True).logits)
    decoded = [codec.from_pb(two_stages.step("s", p, [ids[p]], True).logits) for p in (6, 7)]
    torch.testing.assert_close(torch.cat([prefill, *decoded]), expected, atol=1e-4, rtol=0)
    reply = two_stages.step("s", 8, [3])
    assert not reply.HasField("logits")  # only when asked


def test_info_reports_the_range_and_cache(two_stages):
    two_stages.step("s", 0, [1, 2, 3])
    first = two_stages.stubs[0].Info(pb.InfoRequest())
    last = two_stages.stubs[1].Info(pb.InfoRequest())
    assert (first.layer_start, first.layer_end, first.has_embeddings, first.has_head) == (
        0,
        2,
        True,
        False,
    )
    assert (last.layer_start, last.layer_end, last.has_embeddings, last.has_head) == (
        2,
        4,
        False,
        True,
    )
    assert first.active_sessions == 1 and first.kv_used_bytes > 0
    assert first.model_fingerprint == last.model_fingerprint and first.weight_bytes > 0
    freed = two_stages.stubs[0].EndSession(pb.EndSessionRequest(session_id="s")).freed_bytes
    assert freed == first.kv_used_bytes
    assert two_stages.stubs[0].Info(pb.InfoRequest()).kv_used_bytes == 0


@pytest.mark.parametrize(
    "stage, request_kwargs, code, needle",
    [
        (0, dict(start_pos=3, token_ids=[1]), "NOT_FOUND", "not cached"),
        (0, dict(token_ids=[101]), "INVALID_ARGUMENT", "outside the vocabulary"),
        (0, dict(token_ids=[-1]), "INVALID_ARGUMENT", "outside the vocabulary"),
        (0, dict(token_ids=[]), "INVALID_ARGUMENT", "at least one token"),
        (0, dict(token_ids=[1], session_id=""), "INVALID_ARGUMENT", "session_id"),
        (0, dict(token_ids=[1], plan_epoch=2), "FAILED_PRECONDITION", "epoch"),
        (0, dict(token_ids=[1], hidden=hidden_of((1, 64))), "INVALID_ARGUMENT", "takes token ids"),
        (1, dict(token_ids=[1]), "INVALID_ARGUMENT", "needs a hidden state"),
        (1, dict(token_ids=[1], hidden=hidden_of((2, 64))), "INVALID_ARGUMENT", "must be [1, 64]"),
        (1, dict(token_ids=[1], hidden=hidden_of((1, 63))), "INVALID_ARGUMENT", "must be [1, 64]"),
        (
            1,
            dict(token_ids=[1], hidden=hidden_of((1, 64), torch.float16)),
            "INVALID_ARGUMENT",
            "float32",
        ),
        (
            1,
            dict(token_ids=[1], hidden=pb.Tensor(data=b"xx", shape=[1, 64], dtype=pb.FLOAT32)),
            "INVALID_ARGUMENT",
            "needs 256 bytes",
        ),
        (
            1,
            dict(token_ids=[1], hidden=codec.to_pb(torch.full((1, 64), float("nan")))),
            "INVALID_ARGUMENT",
            "NaN",
        ),
        (
            1,
            dict(token_ids=[1], hidden=hidden_of((1, 64)), sampling=pb.SamplingParams(top_p=2)),
            "INVALID_ARGUMENT",
            "top_p",
        ),
        (0, dict(token_ids=[1] * 300), "INVALID_ARGUMENT", "context of 256"),
    ],
)
def test_bad_steps_get_precise_statuses_and_others_are_still_served(
    two_stages, stage, request_kwargs, code, needle
):
    two_stages.step("live", 0, [1, 2, 3])
    request = pb.StepRequest(**{"session_id": "bad", "plan_epoch": 1, **request_kwargs})
    got_code, details = status_of(two_stages.stubs[stage].Forward, request)
    assert got_code.name == code and needle in details, details
    assert two_stages.step("live", 3, [4]).token_id >= 0  # the live session is intact


def test_full_cache_is_resource_exhausted_and_does_not_evict(tiny):
    stages = Stages(tiny, [0, 4], kv_cache_mb=1)  # 4 layers * 2 * 2 heads * 16 * 4 B = 1 KiB/token
    prompt = [i % 100 + 1 for i in range(250)]  # 256 tokens of capacity each: four fill 1 MiB
    try:
        for session in "abcd":
            stages.step(session, 0, prompt)
        code, details = status_of(
            stages.stubs[0].Forward, pb.StepRequest(session_id="e", plan_epoch=1, token_ids=prompt)
        )
        assert code.name == "RESOURCE_EXHAUSTED" and "--kv-cache-mb" in details
        assert stages.step("a", 250, [7]).token_id >= 0
    finally:
        stages.stop()


def test_stage_without_layers_refuses_steps_and_reports_not_serving(tiny):
    server, port, _ = build_server(StageConfig(model=str(tiny), **OPEN))
    server.start()
    try:
        stub = pb_grpc.StageStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert stub.Health(pb.HealthRequest()).status == pb.HealthReply.NOT_SERVING
        code, details = status_of(stub.Forward, pb.StepRequest(session_id="s", token_ids=[1]))
        assert code.name == "FAILED_PRECONDITION" and "no layers" in details
        code, details = status_of(stub.LoadLayers, pb.LoadLayersRequest(layer_start=2, layer_end=9))
        assert code.name == "INVALID_ARGUMENT" and "4 layers" in details
        code, _ = status_of(stub.EndSession, pb.EndSessionRequest(session_id="s"))
        assert code.name == "FAILED_PRECONDITION"
    finally:
        server.stop(0)


def test_end_unknown_session_is_not_found(two_stages):
    code, details = status_of(
        two_stages.stubs[0].EndSession, pb.EndSessionRequest(session_id="nope")
    )
    assert code.name == "NOT_FOUND" and "nope" in details


def test_a_refused_load_layers_keeps_the_range_in_force(two_stages):
    two_stages.step("live", 0, [1, 2, 3])
    code, details = status_of(
        two_stages.stubs[1].LoadLayers,
        pb.LoadLayersRequest(layer_start=3, layer_end=9, plan_epoch=1),
    )
    assert code.name == "INVALID_ARGUMENT" and "4 layers" in details
    info = two_stages.stubs[1].Info(pb.InfoRequest())
    assert (info.layer_start, info.layer_end, info.plan_epoch) == (2, 4, 1)
    assert two_stages.step("live", 3, [4]).token_id >= 0


def test_only_a_newer_plan_epoch_changes_the_layers(two_stages):
    """Stray or replayed LoadLayers (older or same epoch, an implicit empty range, empty bytes
    that parse as all defaults) are refused and change nothing; a same-epoch retry of the range
    in force is a no-op; holding nothing is an explicit request."""
    stub = two_stages.stubs[1]
    two_stages.step("live", 0, [1, 2, 3])
    refused = [
        (pb.LoadLayersRequest(layer_start=1, layer_end=4, plan_epoch=1), "FAILED_PRECONDITION"),
        (pb.LoadLayersRequest(layer_start=2, layer_end=4, plan_epoch=0), "FAILED_PRECONDITION"),
        (pb.LoadLayersRequest(layer_start=0, layer_end=0, plan_epoch=5), "INVALID_ARGUMENT"),
        (pb.LoadLayersRequest(hold_nothing=True, plan_epoch=1), "FAILED_PRECONDITION"),
        (pb.LoadLayersRequest(hold_nothing=True, layer_end=2, plan_epoch=5), "INVALID_ARGUMENT"),
        (pb.LoadLayersRequest(), "INVALID_ARGUMENT"),  # what b"" parses to
        # a stray epoch near 2**64 would leave no epoch for later plans to go above
        (
            pb.LoadLayersRequest(layer_start=2, layer_end=4, plan_epoch=2**64 - 1),
            "INVALID_ARGUMENT",
        ),
    ]
    for request, expected in refused:
        code, details = status_of(stub.LoadLayers, request)
        assert code.name == expected, (request, details)
    raw = grpc.insecure_channel(two_stages.addresses[1]).unary_unary("/llamadist.Stage/LoadLayers")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = stub.Info(pb.InfoRequest())
    assert (info.layer_start, info.layer_end, info.plan_epoch, info.active_sessions) == (2, 4, 1, 1)

    stub.LoadLayers(two_stages.assignment(2, 4))  # a retry
    assert two_stages.step("live", 3, [4]).token_id >= 0  # the session's cache is still there
    stub.LoadLayers(pb.LoadLayersRequest(hold_nothing=True, plan_epoch=2))
    info = stub.Info(pb.InfoRequest())
    assert (info.layer_start, info.layer_end, info.plan_epoch) == (0, 0, 2)


def test_a_stopping_stage_ends_its_open_streams_instead_of_waiting_out_its_grace(tiny):
    """A predecessor's link or an orchestrator's outlet never ends on its own: drain ends them
    once their work is settled, so the server stops at once rather than after grace_s."""
    from stage_service.server import build

    built = build(StageConfig(model=str(tiny), kv_cache_mb=16, **OPEN))
    server, port = built.server, built.port
    server.start()
    built.stage.load_layers(0, 4, epoch=1)
    link = Link(f"127.0.0.1:{port}", origin="o")
    reply = link.step(pb.StepRequest(session_id="d", plan_epoch=1, token_ids=[1], request_id=1))
    assert not reply.error_code
    t0 = time.monotonic()
    built.drain(time.monotonic() + 30)
    assert server.stop(30).wait(30)
    assert time.monotonic() - t0 < 10 and link.link.broken
