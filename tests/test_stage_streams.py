"""Stage streams: ForwardStream answers each step and survives a bad one, routed steps go stage
to stage and only the last answers, a StepBatch runs as one forward, and a StepLink batches what
queues meanwhile."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
import torch

from protos import codec
from protos import llamadist_pb2 as pb
from protos.shared.step_link import StepLink
from stage_service.config import StageConfig
from stage_service.server import build_server
from tests.stage_servers import DOWN, OPEN, Link, fake_link, forward_stream


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


def test_a_step_batch_runs_in_one_forward_and_is_answered_in_one_reply(two_stages):
    ids = {"b0": [1, 2, 3], "b1": [4, 5], "b2": [6, 7, 8, 9]}
    steps = [
        pb.StepRequest(session_id=s, plan_epoch=1, token_ids=t, request_id=10 + i)
        for i, (s, t) in enumerate(ids.items())
    ]
    (answer,) = forward_stream(two_stages.addresses[0], [pb.StepBatch(steps=steps)])
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
    first, second = forward_stream(two_stages.addresses[0], [pb.StepBatch(steps=steps), later])
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


def test_a_batch_carries_its_steps_rows_as_one_tensor(two_stages):
    """A StepBatch whose hidden holds its steps' rows (as a stage sends them on) answers as the
    same steps with their own hidden states; rows that do not add up fail every step of the
    message, a step with a hidden of its own beside them fails alone, and so does a step whose
    rows hold NaN (the others run)."""
    ids = {"p0": [1, 2], "p1": [3], "p2": [4, 5, 6]}
    first = {s: two_stages.stubs[0].Forward(pb.StepRequest(session_id=s, plan_epoch=1,
                                                           token_ids=t))
             for s, t in ids.items()}  # fmt: skip
    rows = {s: codec.from_pb(r.hidden) for s, r in first.items()}

    def batch(prefix: str, start: int = 0, **hidden) -> pb.StepBatch:
        steps = [pb.StepRequest(session_id=prefix + s, plan_epoch=1, token_ids=t,
                                request_id=i + 1)
                 for i, (s, t) in enumerate(ids.items())]  # fmt: skip
        return pb.StepBatch(steps=steps, **hidden)

    packed = codec.to_pb(torch.cat(list(rows.values())))
    (answer,) = forward_stream(two_stages.addresses[1], [batch("packed-", hidden=packed)])
    own = batch("own-")
    for step, session in zip(own.steps, ids, strict=True):
        step.hidden.CopyFrom(first[session].hidden)
    (expected,) = forward_stream(two_stages.addresses[1], [own])
    assert [r.error_code for r in answer.replies] == [0, 0, 0]
    assert [(r.token_id, r.logprob) for r in answer.replies] == [
        (r.token_id, r.logprob) for r in expected.replies
    ]
    assert all(r.batch_size == 3 for r in answer.replies)

    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    short = codec.to_pb(torch.cat(list(rows.values()))[:-1])
    (answer,) = forward_stream(two_stages.addresses[1], [batch("short-", hidden=short)])
    assert [r.error_code for r in answer.replies] == [invalid] * 3
    assert all("StepBatch.hidden must be [6, hidden_size]" in r.error_message
               for r in answer.replies)  # fmt: skip

    both = batch("both-", hidden=packed)
    both.steps[1].hidden.CopyFrom(first["p1"].hidden)
    (answer,) = forward_stream(two_stages.addresses[1], [both])
    assert [r.error_code for r in answer.replies] == [0, invalid, 0]
    assert "one or the other" in answer.replies[1].error_message

    poisoned = torch.cat(list(rows.values()))
    poisoned[4, 7] = float("nan")  # p2's second row
    nan = batch("nan-", hidden=codec.to_pb(poisoned))
    (answer,) = forward_stream(two_stages.addresses[1], [nan])
    assert [r.error_code for r in answer.replies] == [0, 0, invalid]
    assert "NaN or Inf" in answer.replies[2].error_message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_rows_agrees_with_a_value_by_value_check(dtype):
    from stage_service.steps import finite_rows

    big = torch.finfo(dtype).max
    rows = torch.randn(9, 300).to(dtype)
    rows[1, 3] = float("nan")
    rows[2, 0] = float("inf")
    rows[3, 5], rows[3, 6] = float("inf"), float("-inf")  # a sum of NaN
    rows[4] = big  # every value finite, the sum overflows: checked value by value
    rows[5, :2] = torch.tensor([big, -big], dtype=dtype)
    rows[6, -1] = float("-inf")
    expected = torch.isfinite(rows).all(dim=-1).tolist()
    assert expected == [True, False, False, False, True, True, False, True, True]
    assert finite_rows(rows) == expected
    assert finite_rows(rows[7:]) == [True, True]


def test_a_successors_steps_go_as_messages_under_the_limit_with_their_rows():
    from stage_service.forwarding import step_batches

    rows = [torch.randn(n, 64) for n in (1, 3, 2, 1)]
    group = [(pb.StepRequest(session_id=f"s{i}", token_ids=[1] * len(r)), r)
             for i, r in enumerate(rows)]  # fmt: skip
    (one,) = step_batches(group)
    assert [s.session_id for s in one.steps] == ["s0", "s1", "s2", "s3"]
    assert not any(s.HasField("hidden") for s in one.steps)
    torch.testing.assert_close(codec.from_pb(one.hidden), torch.cat(rows), rtol=0, atol=0)
    limit = 3 * 64 * 4 + 100  # room for three rows a message
    split = step_batches(group, max_bytes=limit)
    assert [[s.session_id for s in b.steps] for b in split] == [["s0"], ["s1"], ["s2", "s3"]]
    assert all(b.ByteSize() <= limit for b in split)
    torch.testing.assert_close(
        torch.cat([codec.from_pb(b.hidden) for b in split]), torch.cat(rows), rtol=0, atol=0
    )


def test_step_batches_without_layers_answer_every_step_with_the_reason(tiny):
    server, port, _ = build_server(StageConfig(model=str(tiny), kv_cache_mb=16, **OPEN))
    server.start()
    try:
        steps = [pb.StepRequest(session_id=f"s{i}", plan_epoch=1, token_ids=[1], request_id=i)
                 for i in range(3)]  # fmt: skip
        (answer,) = forward_stream(f"127.0.0.1:{port}", [pb.StepBatch(steps=steps)])
        assert {r.error_code for r in answer.replies} == {
            grpc.StatusCode.FAILED_PRECONDITION.value[0]
        }
        assert [r.request_id for r in answer.replies] == [0, 1, 2]
        (empty,) = forward_stream(f"127.0.0.1:{port}", [pb.StepBatch()])
        assert not empty.replies
    finally:
        server.stop(0)


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
