"""A session's decode steps made by the scheduler loop (orchestrator/scheduler.py): what
Router.decode returns. The session's thread iterates it for StepResults; the loop sends."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

from orchestrator.admission import POLL_S
from orchestrator.replicas import Replica
from orchestrator.scheduler import Stream
from orchestrator.step_outcome import StageFailed, StepResult, check_alive, outcome
from protos import llamadist_pb2 as pb
from protos.errors import Cancelled, FailedPrecondition, NotFound, Unavailable


class DecodeStream:
    """Router.decode's steps. Iterating ends when the loop ends the stream; `lost_cache` then
    says whether a step failed (marked down where a stage is at fault, like Router.step): the
    session replays its history on its next step. `router`: the Router, whose pool, scheduler,
    origin and step_timeout_s it uses (not imported: the router imports this)."""

    def __init__(self, router, session_id, position, token, sampling, epoch, left,
                 stop_ids, keep_going, cancelled):  # fmt: skip
        self.router = router
        self.session_id = session_id
        self.epoch = epoch
        self.cancelled = cancelled
        self.lost_cache = False
        self._start = (position, token, sampling, left, stop_ids, keep_going)

    def __iter__(self) -> Iterator[StepResult]:
        router = self.router
        position, token, sampling, left, stop_ids, keep_going = self._start
        route = router.pool.route(self.session_id)
        try:
            links = []
            for replica in route:
                try:
                    links.append(replica.client.link())
                except Unavailable as err:
                    raise StageFailed(replica, err) from None
            template = pb.StepRequest(
                session_id=self.session_id,
                plan_epoch=self.epoch,
                sampling=sampling,
                route=[r.client.address for r in route],
                origin=router.origin,
            )
            stream = router.scheduler.open(
                Stream(self.session_id, links[0], template, position, token, left, stop_ids,
                       keep_going)
            )  # fmt: skip
            try:
                while (answer := self._next(stream, route)) is not None:
                    pending, queued_ns, settled_ns = answer
                    router.scheduler.consumed(stream)
                    reply = outcome(route, pending)
                    yield StepResult(
                        reply.token_id, reply.logprob, settled_ns - queued_ns, self.epoch,
                        stage_ns=list(reply.route_compute_ns),
                        stage_batch=list(reply.route_batch_sizes),
                    )  # fmt: skip
            finally:
                router.scheduler.close_stream(stream)
        except StageFailed as failed:
            if isinstance(failed.error, Unavailable | FailedPrecondition):
                router.pool.mark_down(failed.replica, str(failed.error))
            elif not isinstance(failed.error, NotFound):  # NotFound: the stage lost the cache
                raise failed.error from None
            self.lost_cache = True

    def _next(self, stream: Stream, route: list[Replica]):
        """The stream's next answer (None: it ended). Silence for step_timeout_s is checked as
        Router._wait checks it; Cancelled soon after `cancelled` is set."""
        timeout_s = self.router.step_timeout_s
        quiet_since = time.monotonic()
        while True:
            try:
                return stream.answers.get(timeout=POLL_S)
            except queue.Empty:
                pass
            if self.cancelled is not None and self.cancelled.is_set():
                raise Cancelled("the request was cancelled")
            if time.monotonic() - quiet_since >= timeout_s:
                for replica in route:
                    check_alive(replica, timeout_s)
                quiet_since = time.monotonic()
