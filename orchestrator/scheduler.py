"""The scheduler loop: it makes the decode steps of every streaming session and decides which go
down the mesh together.

A session that decodes without drafts opens a `Stream`: from then on its next step is made here
the moment its answer arrives (the sampled token at the next position), not by the session's own
thread, which only consumes the answers (text, stop strings, chunks to its caller) off the
critical path. The session's thread stops its stream when it finishes; the loop ends a stream
itself at eos, at its token limit, when the plan's epoch moves, when its session wants drafts
again, or at the first failed step (the session's thread then handles the failure as a step of
its own would).

Every stream is a member of one cohort. A cohort goes as one batch: the loop waits until each of
its members has its next step queued, then sends the cohort's steps, one StepBatch per
first-stage link. Members join and leave between ticks. How long a queued step waits for the
others:
- for a member whose step is on its way (its answer will queue it), until 1.5 measured rounds
  after the cohort last went (at most MAX_MERGE_WAIT_S): a session that joins while the others
  are out waits for their answers, and pieces of a cohort that drifted apart merge again, so
  that one batch reads the weights once per token instead of once per piece;
- for a member that is neither queued nor on its way (its session has not taken its answers),
  `max_wait_s`; then it is late: not waited for until it queues.

How many cohorts: one when the stages of the route share a device (a batch of every session
reads the weights once per token); one per device when they are separate (a cohort per stage
keeps every stage busy). `cohorts_for` decides from the stages' Info, `--cohorts` overrides it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from orchestrator.inflight import InFlight, Pending
from protos import llamadist_pb2 as pb
from protos.errors import LlamadistError, Unavailable
from protos.shared.step_link import StepLink

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.002  # the longest a queued step waits for members that are not on their way
MAX_MERGE_WAIT_S = 0.1  # the longest it waits for members whose steps are on their way
LOOKAHEAD = 4  # answers a stream may make ahead of its consumer
SETTLE_S = 10.0  # a reload waits this long for the loop's steps on their way


def cohorts_for(stages: list[tuple[pb.StageInfo, str]]) -> int:
    """Cohorts in flight for a route of (Info, address): its distinct devices. Stages on a GPU
    of one host share it; CPU stages own their threads' cores (--threads), so each is a device
    of its own."""
    devices = set()
    for i, (info, address) in enumerate(stages):
        host = address.rsplit(":", 1)[0]
        devices.add((host, info.device) if info.device.startswith("cuda") else i)
    return max(1, len(devices))


@dataclass
class Stream:
    """One session's decode steps, made by the loop. `answers` brings (settled step, when it
    was queued, when it settled, both in perf_counter_ns), then None once the stream ended."""

    session_id: str
    link: StepLink  # to the route's first stage
    template: pb.StepRequest  # session, epoch, sampling, route, origin
    position: int  # start_pos of the next step
    token: int  # the next step's input token
    left: int  # steps the stream may still make
    stop_ids: frozenset[int]  # tokens that end it (eos)
    keep_going: Callable[[], bool]  # False: its session wants its own steps again
    answers: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    pending: Pending | None = None  # its step queued or in flight, with:
    # the step, made once and rewritten for each next one: a step's answer comes only after
    # its link has serialized it (a copy cost ~3 us a step)
    request: pb.StepRequest | None = None
    route: tuple[str, ...] = ()  # the template's
    queued_ns: int = 0  # when it was queued (time.perf_counter_ns)
    sent: bool = False  # that step is on its way
    sent_at: float = 0.0  # since when (time.monotonic)
    made: int = 0  # steps answered
    unconsumed: int = 0
    parked: bool = False  # LOOKAHEAD answers unconsumed: continued once one is taken
    ended: bool = False


@dataclass
class _Cohort:
    members: set[str] = field(default_factory=set)
    late: set[str] = field(default_factory=set)  # members not waited for until they queue
    queued: dict[str, tuple[Stream, float]] = field(default_factory=dict)  # at time.monotonic
    on_way: set[str] = field(default_factory=set)  # members whose step is sent, not settled
    sent_at: float = 0.0  # when it last went (time.monotonic)

    def complete(self) -> bool:
        """Every member it waits for has its step queued (asked at every step settled: the
        count first, the sets only once it can be true)."""
        if not self.queued or len(self.queued) < len(self.members) - len(self.late):
            return False
        return self.members - self.late <= self.queued.keys()

    def deadline(self, max_wait_s: float, merge_wait_s: float) -> float | None:
        """When its queued steps go without the members still missing (None: none queued)."""
        if not self.queued:
            return None
        oldest = min(at for _, at in self.queued.values())
        if not self.on_way & self.members:
            return oldest + max_wait_s
        # members on their way: their answers queue them, about a round after the cohort went
        merged = min(self.sent_at + merge_wait_s, oldest + MAX_MERGE_WAIT_S)
        return max(oldest + max_wait_s, merged)

    def due(self, now: float, max_wait_s: float, merge_wait_s: float) -> bool:
        if self.complete():
            return True
        deadline = self.deadline(max_wait_s, merge_wait_s)
        return deadline is not None and now >= deadline


class Scheduler:
    def __init__(
        self,
        inflight: InFlight,
        epoch_now: Callable[[], int],
        max_wait_s: float = MAX_WAIT_S,
    ):
        """`inflight`: where steps wait for their answers (the router's); `epoch_now()`: the
        plan epoch in force (a stream of another epoch ends)."""
        self.inflight = inflight
        self.epoch_now = epoch_now
        self.max_wait_s = max_wait_s
        self.round_s = 0.0  # a cohort step's round trip, sent to answered (a moving average)
        self.cohorts: list[_Cohort] = [_Cohort()]
        self._cohort_of: dict[str, _Cohort] = {}
        self._streams: dict[str, Stream] = {}
        self._by_request: dict[int, Stream] = {}  # request id of a stream's step
        self._cond = threading.Condition()
        self._closed = False
        self._paused = 0
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    # ---- what sessions and the router call

    def open(self, stream: Stream) -> Stream:
        """Starts a stream (its first step queued at once)."""
        with self._cond:
            if stream.session_id in self._streams:
                raise RuntimeError(f"session {stream.session_id!r} already streams")
            self._streams[stream.session_id] = stream
            cohort = min(self.cohorts, key=lambda c: len(c.members))
            cohort.members.add(stream.session_id)
            self._cohort_of[stream.session_id] = cohort
            self._continue(stream)
            self._cond.notify_all()
        return stream

    def consumed(self, stream: Stream) -> None:
        """Its session took an answer: a parked stream goes on."""
        with self._cond:
            stream.unconsumed -= 1
            if not stream.parked or stream.ended:
                return
            stream.parked = False
            self._continue(stream)
            batches = self._after(self._cohort_of.get(stream.session_id))
        self._send_all(batches)

    def close_stream(self, stream: Stream) -> None:
        """Its session is done with it: a step still queued or in flight is forgotten (its
        answer, if one comes, is dropped)."""
        with self._cond:
            self._end(stream)
            if stream.pending is not None:
                self.inflight.forget(stream.pending.request_id)
                self._by_request.pop(stream.pending.request_id, None)
                stream.pending = None
            self._streams.pop(stream.session_id, None)
            cohort = self._cohort_of.pop(stream.session_id, None)
            if cohort is not None:  # _end took it off the members
                cohort.queued.pop(stream.session_id, None)
            self._cond.notify_all()

    def set_cohorts(self, n: int) -> None:
        """Spreads the members over `n` cohorts."""
        with self._cond:
            if n == len(self.cohorts):
                return
            queued = {s: q for c in self.cohorts for s, q in c.queued.items()}
            self.cohorts = [_Cohort() for _ in range(max(1, n))]
            for i, session_id in enumerate(self._cohort_of):
                cohort = self.cohorts[i % len(self.cohorts)]
                stream = self._streams[session_id]
                if not stream.ended:
                    cohort.members.add(session_id)
                    if stream.sent and stream.pending is not None:
                        cohort.on_way.add(session_id)
                self._cohort_of[session_id] = cohort
                if session_id in queued:
                    cohort.queued[session_id] = queued[session_id]
            self._cond.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No loop step is on its way while this is held (a reload); queued ones wait. A step
        whose answer has not come within SETTLE_S (lost with a stage that died) fails as
        unavailable, so that its session fails over, and a reload never waits forever."""
        with self._cond:
            self._paused += 1
            self._cond.wait_for(lambda: not self._on_their_way(), SETTLE_S)
            lost = self._on_their_way()
        error = Unavailable(f"no answer to a decode step within {SETTLE_S:.0f} s (a reload)")
        for pending in lost:
            self.inflight.fail(pending.request_id, 0, error)  # its session fails over
        with self._cond:
            self._cond.wait_for(lambda: not self._on_their_way(), SETTLE_S)
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def _on_their_way(self) -> list[Pending]:
        """The loop steps sent and not settled (of streams still open). Holds the lock."""
        return [s.pending for s in self._streams.values() if s.sent and s.pending is not None]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- the loop

    def _continue(self, stream: Stream) -> None:
        """Queues the stream's next step, or ends or parks it. Holds the lock."""
        if stream.ended:
            return
        if (
            stream.left <= 0
            or stream.template.plan_epoch != self.epoch_now()
            or (stream.made and not stream.keep_going())  # the first step is always made
        ):
            self._end(stream)
            return
        if stream.unconsumed >= LOOKAHEAD:
            stream.parked = True
            return
        request = stream.request
        if request is None:
            request = stream.request = pb.StepRequest()
            request.CopyFrom(stream.template)
            request.token_ids.append(stream.token)
            stream.route = tuple(request.route)
        request.start_pos = stream.position
        request.token_ids[0] = stream.token
        pending = self.inflight.add(stream.route, on_done=self._settled)
        request.request_id = pending.request_id
        self._by_request[pending.request_id] = stream
        stream.pending, stream.sent = pending, False
        stream.queued_ns = time.perf_counter_ns()
        cohort = self._cohort_of[stream.session_id]
        cohort.queued[stream.session_id] = (stream, time.monotonic())
        cohort.late.discard(stream.session_id)

    def _end(self, stream: Stream) -> None:
        """No more steps: its cohort stops waiting for it, its session reads None last."""
        if not stream.ended:
            stream.ended = True
            stream.answers.put(None)
            cohort = self._cohort_of.get(stream.session_id)
            if cohort is not None:
                cohort.members.discard(stream.session_id)
                cohort.late.discard(stream.session_id)
                cohort.on_way.discard(stream.session_id)
            self._cond.notify_all()

    def _settled(self, pending: Pending) -> None:
        """A loop step's answer (or failure) arrived, on a link's reader thread: the session
        gets it, and the stream's next step is queued right away."""
        with self._cond:
            stream = self._by_request.pop(pending.request_id, None)
            if stream is None or stream.pending is not pending:
                return  # forgotten: the stream was closed meanwhile
            stream.pending = None
            cohort = self._cohort_of.get(stream.session_id)
            if cohort is not None:
                cohort.on_way.discard(stream.session_id)
            if stream.sent:
                self.round_s += 0.1 * (time.monotonic() - stream.sent_at - self.round_s)
            stream.answers.put((pending, stream.queued_ns, time.perf_counter_ns()))
            stream.unconsumed += 1
            stream.made += 1
            reply = pending.reply
            if pending.error is not None or reply is None or reply.error_code:
                self._end(stream)  # its session handles the failure
            else:
                stream.position += 1
                stream.token = reply.token_id
                stream.left -= 1
                if reply.token_id in stream.stop_ids:
                    self._end(stream)
                else:
                    self._continue(stream)
            batches = self._after(cohort)
        self._send_all(batches)

    def _loop(self) -> None:
        while True:
            with self._cond:
                due = self._wait_for_due()
                if due is None:
                    return
                batches = [self._take(cohort) for cohort in due]
            self._send_all(batches)

    def _after(self, cohort: _Cohort | None) -> list[list[Stream]]:
        """What a step queued or settled in `cohort` calls for. Holds the lock. A complete
        cohort is taken, for the calling thread to send: waking the loop for it cost a thread
        hand-off a tick, behind every session thread its answers woke. Else the loop is woken
        only where its timing changed (once a tick, not once a member): a first step queued (a
        deadline to keep), no member left on its way (a shorter one), or a reload waiting for
        the steps on their way."""
        if cohort is None or self._paused or self._closed:
            self._cond.notify_all()
            return []
        if cohort.complete():
            return [self._take(cohort)]
        if len(cohort.queued) == 1 or not cohort.on_way & cohort.members:
            self._cond.notify_all()
        return []

    def _take(self, cohort: _Cohort) -> list[Stream]:
        """The cohort's queued steps, marked on their way. Holds the lock."""
        missing = cohort.members - cohort.late - cohort.queued.keys() - cohort.on_way
        cohort.late |= missing  # not waited for until they queue again
        batch = []
        now = cohort.sent_at = time.monotonic()
        for stream, _ in cohort.queued.values():
            if stream.template.plan_epoch != self.epoch_now():
                self._drop_queued(stream)  # a reload came between
                continue
            stream.sent, stream.sent_at = True, now
            cohort.on_way.add(stream.session_id)
            batch.append(stream)
        cohort.queued.clear()
        return batch

    def _send_all(self, batches: list[list[Stream]]) -> None:
        for batch in batches:
            try:
                self._send(batch)
            except Exception:  # a bug here must not stop every session's steps
                log.exception("sending a cohort failed")

    def _drop_queued(self, stream: Stream) -> None:
        if stream.pending is not None:
            self.inflight.forget(stream.pending.request_id)
            self._by_request.pop(stream.pending.request_id, None)
            stream.pending = None
        self._end(stream)

    @property
    def merge_wait_s(self) -> float:
        """Until when after a cohort went its queued steps wait for its members on their way."""
        return 1.5 * self.round_s

    def _wait_for_due(self) -> list[_Cohort] | None:
        """The cohorts due now (waits until one is); None once closed."""
        while not self._closed:
            now = time.monotonic()
            timeout = None
            if not self._paused:
                merge = self.merge_wait_s
                due = [c for c in self.cohorts if c.due(now, self.max_wait_s, merge)]
                if due:
                    return due
                deadlines = [c.deadline(self.max_wait_s, merge) for c in self.cohorts]
                deadlines = [d for d in deadlines if d is not None]
                if deadlines:
                    timeout = max(0.0, min(deadlines) - now)
            self._cond.wait(timeout)
        return None

    def _send(self, batch: list[Stream]) -> None:
        """One message per first-stage link (replicas of the first position get their own)."""
        by_link: dict[int, list[pb.StepRequest]] = {}
        links: dict[int, StepLink] = {}
        for stream in batch:
            pending = stream.pending
            if pending is None:
                continue  # closed since it was taken
            by_link.setdefault(id(stream.link), []).append(stream.request)
            links[id(stream.link)] = stream.link
        for key, requests in by_link.items():
            try:
                links[key].send(requests)
            except LlamadistError as err:
                for request in requests:
                    self.inflight.fail(request.request_id, 0, err)
