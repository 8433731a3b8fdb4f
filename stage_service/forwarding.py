"""Where a stage sends what a step made: the next stage of its route, or its origin.

A routed step (StepRequest.route) that this stage computed goes on to the next stage of the
route with this stage's hidden state, over one long-lived link per successor (mutual TLS with
the stage's own certificate when TLS is on, the mesh's stage key when it has one). A stage
links only to the stages of the plan it was given (LoadLayersRequest.peer_addresses): a step
whose route names another address is refused (PERMISSION_DENIED naming it) before it runs, so
that no caller can make a stage open a connection of its choosing. The stage that ends the
route answers the step, and so does any stage that fails it: the answer goes to the origin's
outlet (the ForwardStream that declared the origin here), or back on the stream the step came
in on when there is none (the previous stage then hands it to that origin's outlet it holds).
A successor that cannot be reached fails the step with UNAVAILABLE naming the successor
(failed_hop), and so, when a link breaks, do the steps sent on it in the last moments: the
origin drops answers it no longer waits for.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from protos import codec
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import InvalidArgument, LlamadistError, PermissionDenied, Unavailable
from protos.limits import MAX_BATCH_BYTES, split_by_size
from protos.shared.hop import HopDialer
from protos.shared.stage_auth import stage_channel
from protos.shared.step_link import StepLink
from protos.status import code_of

log = logging.getLogger(__name__)

Send = Callable[[list[pb.StepBatchReply]], None]  # puts answers on one stream
Onward = tuple[pb.StepRequest, torch.Tensor]  # a step for the next stage, with its hidden rows
MAX_SUCCESSORS = 64  # channels to next stages one stage keeps
RECENT_S = 5.0  # how long a forwarded step counts as in flight on its link (for a break)


def error_reply(request: pb.StepRequest, err: BaseException, failed_hop: int) -> pb.StepReply:
    origin = request.origin if request.route else ""  # unrouted: answered on its stream
    return failure(request.request_id, origin, err, failed_hop)


def failure(request_id: int, origin: str, err: BaseException, failed_hop: int) -> pb.StepReply:
    """The answer of a step that failed at `failed_hop`."""
    if not isinstance(err, LlamadistError):
        log.error("internal error in a step: %r", err)
    return pb.StepReply(
        request_id=request_id,
        origin=origin,
        error_code=code_of(err).value[0],
        error_message=str(err),
        failed_hop=failed_hop,
    )


def pack(replies: list[pb.StepReply]) -> list[pb.StepBatchReply]:
    """Replies as messages under the limit (hidden states make them large)."""
    return [pb.StepBatchReply(replies=g) for g in split_by_size(replies, MAX_BATCH_BYTES)]


def step_batches(group: list[Onward], max_bytes: int = MAX_BATCH_BYTES) -> list[pb.StepBatch]:
    """Steps for one successor as messages under the limit, each with its steps' hidden rows
    as one tensor (StepBatch.hidden): one encoding a message, not one a step (~25 us each)."""
    batches: list[pb.StepBatch] = []
    steps: list[pb.StepRequest] = []
    rows: list[torch.Tensor] = []
    size = 0
    for step, hidden in group:
        n = step.ByteSize() + 8 + hidden.numel() * hidden.element_size()
        if steps and size + n > max_bytes:
            batches.append(_message(steps, rows))
            steps, rows, size = [], [], 0
        steps.append(step)
        rows.append(hidden)
        size += n
    if steps:
        batches.append(_message(steps, rows))
    return batches


def _message(steps: list[pb.StepRequest], rows: list[torch.Tensor]) -> pb.StepBatch:
    batch = pb.StepBatch(steps=steps)
    codec.to_pb(rows[0] if len(rows) == 1 else torch.cat(rows), out=batch.hidden)
    return batch


@dataclass
class _Sent:
    at: float
    request_id: int
    origin: str
    hop: int  # the successor's hop


class Forwarder:
    def __init__(
        self,
        channel_credentials: grpc.ChannelCredentials | None = None,
        stage_key: str | None = None,
        hop: HopDialer | None = None,
    ):
        """Links to next stages use `channel_credentials` (mutual TLS; None = plaintext) and
        send `stage_key` on every call (None: none); `hop` opens them (None: ForwardStream)."""
        self.channel_credentials = channel_credentials
        self.stage_key = stage_key
        self.hop = hop or HopDialer()
        self._holding: int | None = None  # the thread inside holding(), if any
        self._held_steps: dict[StepLink, list[Onward]] = {}
        self._held_answers: dict[str, list[pb.StepReply]] = {}
        self._outlets: dict[str, Send] = {}
        self._links: dict[str, StepLink] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._recent: dict[StepLink, collections.deque[_Sent]] = {}
        self._lock = threading.Lock()  # the dicts above: reader, compute and link threads

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """The compute thread hands out a batch's results inside this block: what that thread
        sends on or delivers in it is held, and sent when the block ends, so that the steps of
        one batch go to each next stage, and their answers to each origin, as one message.
        From any other thread it goes at once."""
        self._holding = threading.get_ident()
        try:
            yield
        finally:
            self._holding = None
            self._flush()

    def _holds(self) -> bool:
        return self._holding == threading.get_ident()

    # ---------------------------------------------------------------- outlets

    def open_outlet(self, origin: str, send: Send) -> None:
        """Answers to `origin`'s steps go to `send` from now (replacing an older stream)."""
        with self._lock:
            self._outlets[origin] = send

    def close_outlet(self, origin: str, send: Send) -> None:
        with self._lock:
            if self._outlets.get(origin) is send:
                del self._outlets[origin]

    def deliver(self, replies: list[pb.StepReply]) -> list[pb.StepReply]:
        """Sends each reply to its origin's outlet here; returns those that have none."""
        by_outlet: dict[str, list[pb.StepReply]] = {}
        left = []
        hold = self._holds()
        with self._lock:
            for reply in replies:
                if reply.origin in self._outlets:
                    by_outlet.setdefault(reply.origin, []).append(reply)
                else:
                    left.append(reply)
            if hold:
                for origin, group in by_outlet.items():
                    self._held_answers.setdefault(origin, []).extend(group)
                return left
            sends = [(self._outlets[o], group) for o, group in by_outlet.items()]
        for send, group in sends:
            send(pack(group))
        return left

    def _flush(self) -> None:
        """Sends what a batch's results held: steps per next stage, then answers per origin."""
        with self._lock:
            steps, self._held_steps = self._held_steps, {}
        failed = []
        for link, group in steps.items():
            failed += self._send(link, group)
        with self._lock:
            for reply in failed:
                self._held_answers.setdefault(reply.origin, []).append(reply)
            answers, self._held_answers = self._held_answers, {}
            sends = [(self._outlets.get(o), group) for o, group in answers.items()]
        for send, group in sends:
            if send is not None:  # else the origin went away meanwhile
                send(pack(group))

    # ---------------------------------------------------------------- successors

    def send_on(self, steps: list[Onward]) -> list[pb.StepReply]:
        """Sends each step (hop already advanced) with its hidden rows to route[hop], one link
        per successor; returns the answers of those whose successor cannot be reached
        (UNAVAILABLE naming it)."""
        by_address: dict[str, list[Onward]] = {}
        for step, rows in steps:
            by_address.setdefault(step.route[step.hop], []).append((step, rows))
        failed: list[pb.StepReply] = []
        hold = self._holds()
        for address, group in by_address.items():
            try:
                link = self._link(address, group[0][0].hop)
            except LlamadistError as err:
                failed += [error_reply(s, self._unreachable(s, err), s.hop) for s, _ in group]
                continue
            if hold:
                with self._lock:
                    self._held_steps.setdefault(link, []).extend(group)
            else:
                failed += self._send(link, group)
        return failed

    def _send(self, link: StepLink, group: list[Onward]) -> list[pb.StepReply]:
        """The steps on `link`, their rows as one tensor a message; the failures' answers."""
        steps = [step for step, _ in group]
        try:
            self._remember(link, steps)
            link.send_batches(step_batches(group))
        except LlamadistError as err:
            return [error_reply(s, self._unreachable(s, err), s.hop) for s in steps]
        return []

    @staticmethod
    def _unreachable(step: pb.StepRequest, err: LlamadistError) -> Unavailable:
        return Unavailable(
            f"stage {step.hop - 1} could not reach its successor, stage {step.hop} "
            f"({step.route[step.hop]}): {err}"
        )

    def _link(self, address: str, hop: int) -> StepLink:
        with self._lock:
            link = self._links.get(address)
            if link is not None and not link.broken:
                return link
            channel = self._channels.get(address)
            if channel is None:
                self._prune()
                try:
                    channel = self._channel(address)
                except Exception as err:  # noqa: BLE001 - an address grpc cannot parse
                    raise Unavailable(f"no channel to {address!r}: {err}") from None
                self._channels[address] = channel
        name = f"stage {hop} ({address})"  # opened outside the lock: it asks the stage (Info)
        opener = self.hop.opener(address, pb_grpc.StageStub(channel), name)
        link = StepLink(opener, name, on_reply=self._from_successor, on_broken=self._broken)
        with self._lock:
            current = self._links.get(address)
            if current is not None and not current.broken:
                link.close()
                return current
            self._links[address] = link
        return link

    def _prune(self) -> None:
        """Keeps at most MAX_SUCCESSORS channels: those without a live link go first (plans
        come and go; a stage must not hold a channel for every stage it was ever shown)."""
        if len(self._channels) < MAX_SUCCESSORS:
            return
        for address in list(self._channels):
            link = self._links.get(address)
            if link is None or link.broken:
                self._links.pop(address, None)
                self._channels.pop(address).close()
        if len(self._channels) >= MAX_SUCCESSORS:
            raise Unavailable(f"this stage already links to {MAX_SUCCESSORS} successors")

    def _from_successor(self, reply: pb.StepReply) -> None:
        """An answer the successor gave back on our link (it holds no outlet of the origin)."""
        if self.deliver([reply]):
            log.debug("dropped an answer for origin %r: no outlet here", reply.origin)

    def _channel(self, address: str) -> grpc.Channel:
        return stage_channel(address, self.channel_credentials, self.stage_key)

    def _remember(self, link: StepLink, steps: list[pb.StepRequest]) -> None:
        now = time.monotonic()
        with self._lock:
            recent = self._recent.setdefault(link, collections.deque())
            while recent and now - recent[0].at > RECENT_S:
                recent.popleft()
            recent.extend(_Sent(now, s.request_id, s.origin, s.hop) for s in steps)

    def _broken(self, link: StepLink, error: LlamadistError) -> None:
        """A successor's link ended: the steps sent on it lately may be lost; their origins
        hear so (an origin ignores answers to steps it has done with)."""
        with self._lock:
            for address, current in list(self._links.items()):
                if current is link:
                    del self._links[address]
            lost = list(self._recent.pop(link, ()))
        if lost:
            log.info("%s: link broken (%s); failing %d recent steps", link.name, error, len(lost))
        self.deliver(
            [
                failure(
                    s.request_id,
                    s.origin,
                    Unavailable(f"the link from stage {s.hop - 1} to {link.name} broke: {error}"),
                    s.hop,
                )
                for s in lost
            ]
        )

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
            channels, self._channels = list(self._channels.values()), {}
        for link in links:
            link.close()
        for channel in channels:
            channel.close()


MAX_ROUTE = 256  # stages in one route


def check_route(request: pb.StepRequest, holds_head: bool, peers: frozenset[str]) -> None:
    """A step's route, hop and origin make sense for this stage (InvalidArgument otherwise),
    and every stage it goes on to is one of `peers`, the plan's stage addresses
    (PermissionDenied naming the first that is not)."""
    route, hop = request.route, request.hop
    if not route:
        if hop:
            raise InvalidArgument(f"hop {hop} without a route: give the route, or hop 0")
        return
    if len(route) > MAX_ROUTE:
        raise InvalidArgument(f"a route of {len(route)} stages; at most {MAX_ROUTE}")
    if not 0 <= hop < len(route):
        raise InvalidArgument(f"hop {hop} is outside the route of {len(route)} stages")
    if not all(address.strip() for address in route):
        raise InvalidArgument("the route names an empty address")
    if hop < len(route) - 1:
        if not request.origin:
            raise InvalidArgument(
                "a step to forward needs an origin to answer to (StepBatch.origin of a stream "
                "to each stage of the route)"
            )
        if holds_head:
            raise InvalidArgument(
                f"this stage holds the model's head, so the route ends here; it names "
                f"{len(route) - hop - 1} more stage(s)"
            )
        foreign = next((a for a in route[hop + 1 :] if a not in peers), None)
        if foreign is not None:
            known = ", ".join(sorted(peers)) or "none: it holds no plan's layers"
            raise PermissionDenied(
                f"the route names {foreign!r}, which is not a stage of this stage's plan "
                f"({known}); a stage forwards only to the addresses its LoadLayers gave"
            )


def routed_onward(request: pb.StepRequest, compute_ns: int, batch_size: int) -> pb.StepRequest:
    """The step as the next stage of its route gets it, but for its hidden rows (they go in
    their message's StepBatch.hidden): this stage's timing, the next hop. Made in place (this
    stage is done with the request): a copy of each step's fields cost ~50 us a step."""
    request.hop += 1
    request.route_compute_ns.append(compute_ns)
    request.route_batch_sizes.append(batch_size)
    return request
