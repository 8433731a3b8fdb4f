"""Steps never outgrow a gRPC message: the orchestrator's link splits a StepBatch under the
limit, a stage splits its replies under it, and one step that could not fit is refused up front
with INVALID_ARGUMENT naming the limit. The limit is lowered here so that tiny models reach it."""

from __future__ import annotations

import grpc
import pytest

import stage_service.forwarding as forwarding
import stage_service.steps as steps_module
from protos import llamadist_pb2 as pb
from protos.errors import InvalidArgument
from protos.limits import split_by_size
from protos.shared.step_link import StepLink
from tests.stage_servers import Stages, fake_link, forward_stream


def step(i: int, tokens: int) -> pb.StepRequest:
    return pb.StepRequest(session_id=f"s{i}", plan_epoch=1, token_ids=[1] * tokens, request_id=i)


def test_split_by_size_keeps_order_and_every_group_under_the_limit():
    steps = [step(i, n) for i, n in enumerate([10, 400, 30, 200, 200, 5])]
    groups = list(split_by_size(steps, 500))
    assert [s.request_id for g in groups for s in g] == list(range(6))
    assert all(sum(s.ByteSize() + 8 for s in g) <= 500 for g in groups) and len(groups) > 1


def test_the_link_splits_a_batch_and_refuses_one_step_over_the_limit():
    open_stream, opened, answers = fake_link()
    stream = StepLink(open_stream, "stage 0", lambda _: None, max_batch_bytes=1000)
    with pytest.raises(InvalidArgument, match="over the 1,000-byte limit"):
        stream.send([step(0, 2000)])
    for i in range(6):  # queued before the sender runs: one batch if there were no limit
        stream.send([step(i, 200)])
    sent = []
    while sum(len(b.steps) for b in sent) < 6:
        sent.append(next(opened[0]))
    assert len(sent) > 1 and all(b.ByteSize() <= 1000 + 16 for b in sent)
    stream.close()


@pytest.fixture
def first_stage(tiny_root):
    from tests.conftest import make_tiny_model

    harness = Stages(make_tiny_model(tiny_root, "gqa"), [0, 2])  # hidden 64, float32
    yield harness
    harness.stop()


def test_a_stage_splits_its_replies_under_the_limit(first_stage, monkeypatch):
    # the first stage answers 256 bytes of hidden state per token to a few bytes of token ids
    monkeypatch.setattr(forwarding, "MAX_BATCH_BYTES", 8000)
    steps = [step(i, 20) for i in range(4)]  # 4 x 5,120 bytes of hidden state
    replies = forward_stream(first_stage.addresses[0], [pb.StepBatch(steps=steps)])
    assert len(replies) > 1 and all(r.ByteSize() <= 8000 + 16 for r in replies)
    answered = [r for m in replies for r in m.replies]
    assert sorted(r.request_id for r in answered) == [0, 1, 2, 3]
    assert all(not r.error_code and list(r.hidden.shape) == [20, 64] for r in answered)


def test_a_step_whose_answer_cannot_fit_is_refused_naming_the_limit(first_stage, monkeypatch):
    monkeypatch.setattr(steps_module, "MAX_BATCH_BYTES", 8000)
    with pytest.raises(grpc.RpcError) as err:
        first_stage.stubs[0].Forward(step(0, 40), timeout=10)  # 40 x 256 bytes of answer
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "8,000-byte message limit" in err.value.details()
    assert "at most 31 tokens per step" in err.value.details()
