"""The orchestrator's link to one stage: a channel, deadlines, and errors that name the stage."""

from __future__ import annotations

import threading
import time

import grpc

from orchestrator.step_stream import OnReply, StepStream
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import Unavailable
from protos.serving import GRPC_OPTIONS
from protos.status import from_rpc_error


class StageClient:
    def __init__(
        self,
        address: str,
        index: int,
        step_timeout_s: float = 60.0,
        *,
        channel_credentials: grpc.ChannelCredentials | None = None,
    ):
        """`channel_credentials` (protos.security.channel_credentials): mutual TLS toward the
        stage; None = plaintext."""
        self.address = address
        self.index = index
        self.step_timeout_s = step_timeout_s
        if channel_credentials is None:
            self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        else:
            self.channel = grpc.secure_channel(address, channel_credentials, options=GRPC_OPTIONS)
        self.stub = pb_grpc.StageStub(self.channel)
        self._stream: StepStream | None = None
        self._stream_lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"stage {self.index} ({self.address})"

    def _call(self, method, request, timeout_s: float):
        try:
            return method(request, timeout=timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.name) from None
        except ValueError as err:  # "Cannot invoke RPC on closed channel!" while shutting down
            raise Unavailable(f"{self.name}: {err}") from None

    def submit(self, request: pb.StepRequest, on_reply: OnReply) -> int:
        """A step over this link's ForwardStream (opened again when it broke); see
        StepStream.submit. Returns the request id, for `forget`."""
        with self._stream_lock:
            if self._stream is None or self._stream.broken:
                self._stream = StepStream(self.stub.ForwardStream, lambda: self.name)
            stream = self._stream
        return stream.submit(request, on_reply)

    def forget(self, request_id: int) -> None:
        stream = self._stream
        if stream is not None:
            stream.forget(request_id)

    def end_session(self, session_id: str) -> int:
        reply = self._call(self.stub.EndSession, pb.EndSessionRequest(session_id=session_id), 2)
        return reply.freed_bytes

    def health(self, timeout_s: float = 2.0) -> tuple[bool, str]:
        """(serving, why not): answered by the stage's RPC threads even while it computes."""
        reply = self._call(self.stub.Health, pb.HealthRequest(), timeout_s)
        return reply.status == pb.HealthReply.SERVING, reply.detail

    def info(self, timeout_s: float = 10.0) -> pb.StageInfo:
        return self._call(self.stub.Info, pb.InfoRequest(), timeout_s)

    def load_layers(self, start: int, end: int, epoch: int) -> pb.StageInfo:
        request = pb.LoadLayersRequest(layer_start=start, layer_end=end, plan_epoch=epoch)
        return self._call(self.stub.LoadLayers, request, 600)

    def drop_layers(self, epoch: int) -> pb.StageInfo:
        request = pb.LoadLayersRequest(hold_nothing=True, plan_epoch=epoch)
        return self._call(self.stub.LoadLayers, request, 60)

    def wait_ready(self, timeout_s: float) -> None:
        """Polls until the stage answers Info (it need not hold layers yet): each try waits for
        the connection (wait_for_ready) for up to 2 s."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"{self.name} did not answer within {timeout_s:.0f} s")
            try:
                self.stub.Info(pb.InfoRequest(), timeout=min(remaining, 2.0), wait_for_ready=True)
                return
            except grpc.RpcError:
                continue

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self.channel.close()
