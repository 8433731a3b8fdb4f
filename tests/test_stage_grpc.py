"""A real stage server on port 0: the last stage's logits against transformers, and every kind of
bad input answered with a precise status while other sessions keep being served."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
import torch

from protos import codec
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.shared.step_link import StepLink, reply_error
from stage_service.config import StageConfig
from stage_service.server import build_server
from tests.conftest import make_tiny_model, reference_model

# Unit-level servers: open stages (tests/test_security_stage_key.py covers their credentials).
OPEN = dict(insecure_open_stage=True)
DOWN = "127.0.0.1:1"  # a stage of the plan that is down: nothing listens there


class Stages:
    def __init__(self, model_dir, bounds, kv_cache_mb=16):
        self.servers, self.stubs, self.addresses = [], [], []
        for _ in bounds[1:]:
            server, port, _ = build_server(
                StageConfig(model=str(model_dir), kv_cache_mb=kv_cache_mb, **OPEN)
            )
            server.start()
            self.addresses.append(f"127.0.0.1:{port}")
            self.stubs.append(pb_grpc.StageStub(grpc.insecure_channel(f"127.0.0.1:{port}")))
            self.servers.append(server)
        self.peers = [*self.addresses, DOWN]  # the plan's stage addresses
        for stub, a, b in zip(self.stubs, bounds, bounds[1:], strict=False):
            stub.LoadLayers(self.assignment(a, b))

    def assignment(self, start: int, end: int, epoch: int = 1) -> pb.LoadLayersRequest:
        return pb.LoadLayersRequest(
            layer_start=start, layer_end=end, plan_epoch=epoch, peer_addresses=self.peers
        )

    def step(self, session, start, ids, return_logits=False) -> pb.StepReply:
        hidden = None
        for stub in self.stubs:
            reply = stub.Forward(
                pb.StepRequest(
                    session_id=session,
                    plan_epoch=1,
                    start_pos=start,
                    token_ids=ids,
                    hidden=hidden,
                    return_logits=return_logits,
                )
            )
            hidden = reply.hidden
        return reply

    def stop(self):
        for s in self.servers:
            s.stop(0)


@pytest.fixture
def tiny(tiny_root):
    return make_tiny_model(tiny_root, "gqa")


@pytest.fixture
def two_stages(tiny):
    stages = Stages(tiny, [0, 2, 4])
    yield stages
    stages.stop()


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


def _status(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), info.value.details()


def hidden_of(shape, dtype=torch.float32):
    return codec.to_pb(torch.zeros(shape, dtype=dtype))


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
    got_code, details = _status(two_stages.stubs[stage].Forward, request)
    assert got_code.name == code and needle in details, details
    assert two_stages.step("live", 3, [4]).token_id >= 0  # the live session is intact


def test_full_cache_is_resource_exhausted_and_does_not_evict(tiny):
    stages = Stages(tiny, [0, 4], kv_cache_mb=1)  # 4 layers * 2 * 2 heads * 16 * 4 B = 1 KiB/token
    prompt = [i % 100 + 1 for i in range(250)]  # 256 tokens of capacity each: four fill 1 MiB
    try:
        for session in "abcd":
            stages.step(session, 0, prompt)
        code, details = _status(
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
        code, details = _status(stub.Forward, pb.StepRequest(session_id="s", token_ids=[1]))
        assert code.name == "FAILED_PRECONDITION" and "no layers" in details
        code, details = _status(stub.LoadLayers, pb.LoadLayersRequest(layer_start=2, layer_end=9))
        assert code.name == "INVALID_ARGUMENT" and "4 layers" in details
        code, _ = _status(stub.EndSession, pb.EndSessionRequest(session_id="s"))
        assert code.name == "FAILED_PRECONDITION"
    finally:
        server.stop(0)


def test_end_unknown_session_is_not_found(two_stages):
    code, details = _status(two_stages.stubs[0].EndSession, pb.EndSessionRequest(session_id="nope"))
    assert code.name == "NOT_FOUND" and "nope" in details


def test_a_refused_load_layers_keeps_the_range_in_force(two_stages):
    two_stages.step("live", 0, [1, 2, 3])
    code, details = _status(
        two_stages.stubs[1].LoadLayers,
        pb.LoadLayersRequest(layer_start=3, layer_end=9, plan_epoch=1),
    )
    assert code.name == "INVALID_ARGUMENT" and "4 layers" in details
    info = two_stages.stubs[1].Info(pb.InfoRequest())
    assert (info.layer_start, info.layer_end, info.plan_epoch) == (2, 4, 1)
    assert two_stages.step("live", 3, [4]).token_id >= 0


class Link:
    """A StepLink to a stage (declaring `origin` when given) whose answers are kept by id."""

    def __init__(self, address: str, origin: str = ""):
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        stub = pb_grpc.StageStub(grpc.insecure_channel(address))
        self.link = StepLink(stub.ForwardStream, address, self.replies.put, origin=origin)
        self.link.wait_registered(10)

    def answer(self, timeout_s: float = 10) -> pb.StepReply:
        return self.replies.get(timeout=timeout_s)

    def step(self, request: pb.StepRequest, timeout_s: float = 10) -> pb.StepReply:
        """Sends a step and waits for its answer on this link (raises the step's error)."""
        self.link.send([request])
        reply = self.answer(timeout_s)
        assert reply.request_id == request.request_id
        error = reply_error(reply, "stage")
        if error is not None:
            raise error
        return reply

    def close(self) -> None:
        self.link.close()


def test_forward_stream_answers_each_step_and_survives_a_bad_one(two_stages):
    from protos.errors import InvalidArgument

    link = Link(two_stages.addresses[0])
    try:
        ok = link.step(pb.StepRequest(session_id="st", plan_epoch=1, token_ids=[1, 2],
                                      request_id=1))  # fmt: skip
        unary = two_stages.stubs[0].Forward(
            pb.StepRequest(session_id="un", plan_epoch=1, token_ids=[1, 2])
        )
        assert ok.hidden == unary.hidden and ok.request_id == 1
        with pytest.raises(InvalidArgument, match="outside the vocabulary"):
            link.step(pb.StepRequest(session_id="st", plan_epoch=1, token_ids=[999],
                                     request_id=2))  # fmt: skip
        again = link.step(pb.StepRequest(session_id="st", plan_epoch=1, start_pos=2,
                                         token_ids=[3], request_id=3))  # fmt: skip
        assert again.request_id == 3 and not again.error_code and not link.link.broken
    finally:
        link.close()


def routed(session: str, route: list[str], request_id: int, origin: str = "o", **kw):
    return pb.StepRequest(
        session_id=session, plan_epoch=1, route=route, origin=origin, request_id=request_id, **kw
    )


def test_a_routed_step_goes_stage_to_stage_and_only_the_last_answers(two_stages):
    """Stage 0 forwards its hidden state to stage 1, whose answer arrives on the origin's outlet
    there: the same token as the step carried by hand, with both stages' compute times."""
    ids = [5, 17, 33, 2]
    by_hand = two_stages.step("hand", 0, ids)
    first, last = (Link(a, origin="o") for a in two_stages.addresses)
    try:
        first.link.send([routed("r", two_stages.addresses, 7, token_ids=ids)])
        reply = last.answer()
        assert (reply.request_id, reply.origin, reply.error_code) == (7, "o", 0)
        assert (reply.token_id, reply.logprob) == (by_hand.token_id, by_hand.logprob)
        assert len(reply.route_compute_ns) == 2 and all(ns > 0 for ns in reply.route_compute_ns)
        assert first.replies.empty()  # nothing comes back on the way in
        # one compute batch of three steps goes on to the next stage as one batch
        batch = [routed(f"b{i}", two_stages.addresses, 10 + i, token_ids=[i + 1, 4])
                 for i in range(3)]  # fmt: skip
        first.link.send(batch)
        answers = [last.answer() for _ in range(3)]
        assert sorted(r.request_id for r in answers) == [10, 11, 12]
        assert all(r.batch_size == 3 and not r.error_code for r in answers)
    finally:
        first.close()
        last.close()


def test_an_answer_comes_back_the_way_in_where_the_last_stage_holds_no_outlet(two_stages):
    first = Link(two_stages.addresses[0], origin="only-here")
    try:
        first.link.send([routed("w", two_stages.addresses, 3, origin="only-here", token_ids=[1])])
        reply = first.answer()
        assert (reply.request_id, reply.error_code) == (3, 0) and reply.token_id >= 0
    finally:
        first.close()


def test_an_unreachable_successor_fails_the_step_naming_it(two_stages):
    first = Link(two_stages.addresses[0], origin="o")
    try:
        first.link.send([routed("u", [two_stages.addresses[0], DOWN], 4, token_ids=[1])])
        reply = first.answer(30)
        assert reply.error_code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert reply.failed_hop == 1 and DOWN in reply.error_message
        assert two_stages.step("live", 0, [1, 2]).token_id >= 0  # the stages serve on
    finally:
        first.close()


@pytest.mark.parametrize(
    "route_of, origin, needle",
    [
        (lambda a: a, "", "needs an origin"),
        (lambda a: [*a, a[0]], "o", "holds the model's head"),
        (lambda a: [a[0], " "], "o", "empty address"),
    ],
)
def test_a_route_that_cannot_be_followed_is_invalid_argument(two_stages, route_of, origin, needle):
    route = route_of(two_stages.addresses)
    first, last = (Link(a, origin="o") for a in two_stages.addresses)
    try:
        first.link.send([routed("bad", route, 5, origin=origin, token_ids=[1])])
        reply = (first if needle != "holds the model's head" else last).answer()
        assert reply.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0], reply
        assert needle in reply.error_message
    finally:
        first.close()
        last.close()


def test_garbage_on_the_stream_ends_it_with_invalid_argument(two_stages):
    call = grpc.insecure_channel(two_stages.addresses[0]).stream_stream(
        "/llamadist.Stage/ForwardStream"
    )
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([b"\xff\xff\xff\xff"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert two_stages.step("live", 0, [1, 2]).token_id >= 0


def _forward_stream(address: str, batches: list[pb.StepBatch]) -> list[pb.StepBatchReply]:
    stub = pb_grpc.StageStub(grpc.insecure_channel(address))
    return list(stub.ForwardStream(iter(batches), timeout=10))


def test_a_step_batch_runs_in_one_forward_and_is_answered_in_one_reply(two_stages):
    ids = {"b0": [1, 2, 3], "b1": [4, 5], "b2": [6, 7, 8, 9]}
    steps = [
        pb.StepRequest(session_id=s, plan_epoch=1, token_ids=t, request_id=10 + i)
        for i, (s, t) in enumerate(ids.items())
    ]
    (answer,) = _forward_stream(two_stages.addresses[0], [pb.StepBatch(steps=steps)])
    assert [r.request_id for r in answer.replies] == [10, 11, 12]
    assert all(r.batch_size == 3 and not r.error_code for r in answer.replies)
    for reply, (session, tokens) in zip(answer.replies, ids.items(), strict=True):
        alone = two_stages.stubs[0].Forward(
            pb.StepRequest(session_id=f"alone-{session}", plan_epoch=1, token_ids=tokens)
        )
        torch.testing.assert_close(codec.from_pb(reply.hidden), codec.from_pb(alone.hidden))


def test_one_bad_step_in_a_batch_fails_only_itself(two_stages):
    good = dict(plan_epoch=1, token_ids=[1, 2])
    steps = [
        pb.StepRequest(session_id="g0", request_id=1, **good),
        pb.StepRequest(session_id="bad-vocab", plan_epoch=1, token_ids=[999], request_id=2),
        pb.StepRequest(
            session_id="bad-tensor",
            request_id=3,
            hidden=pb.Tensor(data=b"\x00" * 3, shape=[2, 64], dtype=99),
            **good,
        ),
        pb.StepRequest(session_id="bad-epoch", plan_epoch=7, token_ids=[1], request_id=4),
        pb.StepRequest(session_id="g1", request_id=5, **good),
    ]
    later = pb.StepBatch(steps=[pb.StepRequest(session_id="g0", request_id=6, plan_epoch=1,
                                               start_pos=2, token_ids=[3])])  # fmt: skip
    first, second = _forward_stream(two_stages.addresses[0], [pb.StepBatch(steps=steps), later])
    codes = [grpc.StatusCode.OK.value[0]] + [
        code.value[0]
        for code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    ] + [0]  # fmt: skip
    assert [r.error_code for r in first.replies] == codes
    assert [r.request_id for r in first.replies] == [1, 2, 3, 4, 5]
    assert "outside the vocabulary" in first.replies[1].error_message
    assert "dtype 99" in first.replies[2].error_message
    assert first.replies[0].batch_size == 2 and first.replies[4].HasField("hidden")
    assert second.replies[0].request_id == 6 and not second.replies[0].error_code


def test_step_batches_without_layers_answer_every_step_with_the_reason(tiny):
    server, port, _ = build_server(StageConfig(model=str(tiny), kv_cache_mb=16, **OPEN))
    server.start()
    try:
        steps = [pb.StepRequest(session_id=f"s{i}", plan_epoch=1, token_ids=[1], request_id=i)
                 for i in range(3)]  # fmt: skip
        (answer,) = _forward_stream(f"127.0.0.1:{port}", [pb.StepBatch(steps=steps)])
        assert {r.error_code for r in answer.replies} == {
            grpc.StatusCode.FAILED_PRECONDITION.value[0]
        }
        assert [r.request_id for r in answer.replies] == [0, 1, 2]
        (empty,) = _forward_stream(f"127.0.0.1:{port}", [pb.StepBatch()])
        assert not empty.replies
    finally:
        server.stop(0)


def fake_link():
    """A stand-in for a ForwardStream call: `opened` gets the request iterator the stream hands
    to grpc; what is put on `answers` comes back as replies."""
    opened, answers = [], queue.SimpleQueue()

    class FakeCall:
        def __iter__(self):
            return iter(answers.get, None)

        def cancel(self):
            answers.put(None)

    def open_stream(batches):
        opened.append(batches)
        return FakeCall()

    return open_stream, opened, answers


def test_a_link_sends_the_steps_queued_meanwhile_as_one_batch():
    """Three callers queue while the stream is busy: one StepBatch carries all three, and each
    reply of the answer reaches the link's owner."""
    open_stream, opened, answers = fake_link()
    got: queue.SimpleQueue = queue.SimpleQueue()
    link = StepLink(open_stream, "stage 0", got.put)
    threads = [
        threading.Thread(target=link.send, args=([pb.StepRequest(session_id=f"s{i}",
                                                                  token_ids=[i])],))
        for i in range(3)
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batch = next(opened[0])
    assert sorted(s.session_id for s in batch.steps) == ["s0", "s1", "s2"]
    answers.put(pb.StepBatchReply(replies=[pb.StepReply(token_id=100 + s.token_ids[0])
                                           for s in batch.steps]))  # fmt: skip
    assert sorted(got.get(timeout=10).token_id for _ in range(3)) == [100, 101, 102]
    link.close()


def test_a_link_with_an_origin_declares_it_first_and_waits_for_the_stage():
    open_stream, opened, answers = fake_link()
    link = StepLink(open_stream, "stage 0", lambda r: None, origin="me")
    assert next(opened[0]) == pb.StepBatch(origin="me")
    assert not link.registered.is_set()
    answers.put(pb.StepBatchReply())
    link.wait_registered(10)
    link.close()


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
        code, details = _status(stub.LoadLayers, request)
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
