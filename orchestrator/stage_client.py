"""The orchestrator's link to one stage: a channel, deadlines, errors that name the stage, and
one long-lived step link (protos.shared.step_link) that is also this orchestrator's outlet there."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import Unavailable
from protos.shared.hop import HopDialer
from protos.shared.stage_auth import stage_channel
from protos.shared.step_link import OnReply, StepLink
from protos.status import from_rpc_error

LINK_OPEN_S = 10.0  # a stage must confirm a new step link within this
REFUSED_CALLER = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class StageClient:
    def __init__(
        self,
        address: str,
        index: int,
        step_timeout_s: float = 60.0,
        *,
        channel_credentials: grpc.ChannelCredentials | None = None,
        stage_key: str | None = None,
        hop: HopDialer | None = None,
        origin: str = "",
        on_reply: OnReply | None = None,
        on_broken: Callable[[str, Exception], None] | None = None,
    ):
        """`channel_credentials` (protos.shared.security.channel_credentials): mutual TLS toward the
        stage; None = plaintext. `stage_key`: sent on every call (protos.shared.stage_auth); None =
        none. The step link declares `origin` and hands every answer that
        arrives on it to `on_reply`; `on_broken(address, error)` when it ends."""
        self.address = address
        self.index = index
        self.step_timeout_s = step_timeout_s
        self.channel = stage_channel(address, channel_credentials, stage_key)
        self.stub = pb_grpc.StageStub(self.channel)
        self.hop = hop or HopDialer()  # opens the step link: the hop socket, or ForwardStream
        self.origin = origin
        self.on_reply = on_reply or (lambda reply: None)
        self.on_broken = on_broken
        self._link: StepLink | None = None
        self._link_lock = threading.Lock()

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

    def link(self) -> StepLink:
        """The step link, opened (again, after a break) and confirmed as this orchestrator's
        outlet; Unavailable if the stage does not confirm it within LINK_OPEN_S."""
        with self._link_lock:
            if self._link is None or self._link.broken:
                self._link = StepLink(
                    self.hop.opener(self.address, self.stub, self.name),
                    self.name,
                    self.on_reply,
                    self._broken,
                    origin=self.origin,
                )
                self._link.wait_registered(LINK_OPEN_S)
            return self._link

    def _broken(self, link: StepLink, error: Exception) -> None:
        if self.on_broken is not None:
            self.on_broken(self.address, error)

    def end_session(self, session_id: str) -> int:
        reply = self._call(self.stub.EndSession, pb.EndSessionRequest(session_id=session_id), 2)
        return reply.freed_bytes

    def health(self, timeout_s: float = 2.0) -> tuple[bool, str]:
        """(serving, why not): answered by the stage's RPC threads even while it computes."""
        reply = self._call(self.stub.Health, pb.HealthRequest(), timeout_s)
        return reply.status == pb.HealthReply.SERVING, reply.detail

    def info(self, timeout_s: float = 10.0) -> pb.StageInfo:
        return self._call(self.stub.Info, pb.InfoRequest(), timeout_s)

    def load_layers(
        self, start: int, end: int, epoch: int, peers: list[str] | tuple[str, ...] = ()
    ) -> pb.StageInfo:
        """`peers`: every stage address of the plan, the only ones the stage forwards to."""
        request = pb.LoadLayersRequest(
            layer_start=start, layer_end=end, plan_epoch=epoch, peer_addresses=sorted(peers)
        )
        return self._call(self.stub.LoadLayers, request, 600)

    def drop_layers(self, epoch: int) -> pb.StageInfo:
        request = pb.LoadLayersRequest(hold_nothing=True, plan_epoch=epoch)
        return self._call(self.stub.LoadLayers, request, 60)

    def wait_ready(self, timeout_s: float) -> None:
        """Polls until the stage answers Info (it need not hold layers yet): each try waits for
        the connection (wait_for_ready) for up to 2 s. A stage that refuses this orchestrator's
        credential says so at once (waiting would not change it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"{self.name} did not answer within {timeout_s:.0f} s")
            try:
                self.stub.Info(pb.InfoRequest(), timeout=min(remaining, 2.0), wait_for_ready=True)
                return
            except grpc.RpcError as err:
                if err.code() in REFUSED_CALLER:
                    raise from_rpc_error(err, self.name) from None
                continue

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
        self.channel.close()
