"""What the stage tests share: stages on port 0 over the tests' tiny model (`Stages`, open:
tests/test_security_stage_key.py covers their credentials), a StepLink whose answers are kept by
id (`Link`), a stand-in for a ForwardStream call (`fake_link`), and the status of a refused call."""

from __future__ import annotations

import queue

import grpc
import pytest
import torch

from protos import codec
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.shared.step_link import StepLink, reply_error
from stage_service.config import StageConfig
from stage_service.server import build_server

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


def status_of(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), info.value.details()


def hidden_of(shape, dtype=torch.float32):
    return codec.to_pb(torch.zeros(shape, dtype=dtype))


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


def forward_stream(address: str, batches: list[pb.StepBatch]) -> list[pb.StepBatchReply]:
    stub = pb_grpc.StageStub(grpc.insecure_channel(address))
    return list(stub.ForwardStream(iter(batches), timeout=10))


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
