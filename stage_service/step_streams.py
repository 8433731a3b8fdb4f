"""The ForwardStream calls open on a stage: each batch a stream brings is queued for the compute
thread as one; when its steps are done, each goes on to the next stage of its route or is
answered, on this stream or at its origin's outlet (forwarding.Forwarder). A stream that
declares an origin (StepBatch.origin) is that origin's outlet here while it is open."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

from protos import llamadist_pb2 as pb
from protos.errors import InvalidArgument, LlamadistError
from stage_service.batcher import Job
from stage_service.forwarding import Forwarder, Send, check_route, error_reply, pack, routed_onward
from stage_service.stage import Stage
from stage_service.steps import StepInput, StepOutput, batch_rows

# What a stream's outbox carries: (kind, item).
BATCH = "batch"  # one of its batches is settled: the answers given on this stream (maybe none)
OUTLET = "outlet"  # answers for the origin it declared, from other links; or a ping's answer
END = "end"  # the caller stopped sending (item: None), or its stream broke (item: the error)
CLOSE = "close"  # the stage is shutting down


class StepStreams:
    def __init__(self, stage: Stage, forwarder: Forwarder):
        self.stage = stage
        self.forwarder = forwarder
        self._outboxes: set[queue.SimpleQueue] = set()  # of the streams open now
        self._lock = threading.Lock()
        self._closing = False

    def serve(
        self,
        batches: Iterator[pb.StepBatch],
        gone: Callable[[], bool],
        write: Callable[[pb.StepBatchReply], None] | None = None,
        more: Callable[[], bool] | None = None,
    ) -> Iterator[pb.StepBatchReply]:
        """One stream: a reader thread queues each batch for the compute thread as it arrives;
        this thread writes what is put on the outbox. It ends when the caller has stopped
        sending and every batch is settled. `gone()`: the caller closed the stream (what it
        queued is dropped). With `write` (the hop socket's) answers are written by the thread
        that makes them, and this one only waits for the end. `more()`: whether the caller's
        next message is already on its way in (the hop socket's; without it no small batch runs
        on the reader thread, Batcher.submit_many)."""
        stream = _Stream(self, gone, write, more)
        with self._lock:
            self._outboxes.add(stream.outbox)
            ending = self._closing
        threading.Thread(
            target=stream.read, args=(batches,), name="stream-reader", daemon=True
        ).start()
        try:
            yield from stream.replies(ending)
        finally:
            with self._lock:
                self._outboxes.discard(stream.outbox)
            for origin in stream.origins:
                self.forwarder.close_outlet(origin, stream.outlet)

    def drain(self, deadline: float) -> None:
        """Shutting down: every open stream ends once the batches it took are settled (its
        caller sees the stream end and fails over), and the links to next stages close, so
        that no peer's stream holds the server up for its whole grace period."""
        with self._lock:
            self._closing = True
            outboxes = list(self._outboxes)
        for outbox in outboxes:
            outbox.put((CLOSE, None))
        while time.monotonic() < deadline:
            with self._lock:
                if not self._outboxes:
                    break
            time.sleep(0.05)
        self.forwarder.close()

    def submit(
        self, batch: pb.StepBatch, settle: Send, gone: Callable[[], bool], inline: bool = False
    ) -> None:
        """Queues a batch's steps together (one batch of the compute thread where they fit).
        When all are done (on the compute thread, or here when none could be queued), each goes
        on to the next stage of its route or is answered. `settle` gets, once per batch, the
        answers that go back on the batch's own stream (maybe none). `inline`: nothing else
        waits behind it on its stream (Batcher.submit_many)."""
        requests = list(batch.steps)
        answers: list[pb.StepReply | None] = [None] * len(requests)  # None: sent on
        steps, queued = [], []
        try:
            rows = batch_rows(batch)
        except InvalidArgument as err:  # the message's rows: none of its steps runs
            answers = [error_reply(request, err, request.hop) for request in requests]
            rows = []
        routes: dict[tuple, LlamadistError | None] = {}  # checked once per distinct route
        for i, (request, hidden) in enumerate(zip(requests, rows, strict=False)):
            try:
                key = (tuple(request.route), request.hop, bool(request.origin))
                if key not in routes:
                    routes[key] = self._route_error(request)
                if routes[key] is not None:
                    raise routes[key]
                steps.append(StepInput.from_pb(request, hidden))
                queued.append(i)
            except Exception as err:  # noqa: BLE001 - a step that does not decode
                answers[i] = error_reply(request, err, request.hop)

        def done(jobs: list[Job]) -> None:
            onward = []
            for i, job in zip(queued, jobs, strict=True):
                request = requests[i]
                if job.error is not None:
                    answers[i] = error_reply(request, job.error, request.hop)
                elif request.hop < len(request.route) - 1:
                    out = job.out
                    onward.append(
                        (routed_onward(request, out.compute_ns, out.batch_size), out.hidden)
                    )
                else:
                    answers[i] = answer(request, job.out)
            given = [a for a in answers if a is not None] + self.forwarder.send_on(onward)
            # unrouted steps are answered here, in the batch's order; routed ones at their
            # origin's outlet, or here when this stage holds none
            here = [a for a in given if not a.origin]
            here += self.forwarder.deliver([a for a in given if a.origin])
            settle(pack(here))

        try:
            self.stage.run_steps(steps, done, gone, inline)
        except Exception as err:  # noqa: BLE001 - no layers, shutting down: every step fails
            for i in queued:
                answers[i] = error_reply(requests[i], err, requests[i].hop)
            queued.clear()
            done([])

    def _route_error(self, request: pb.StepRequest) -> LlamadistError | None:
        try:
            check_route(request, self.stage.holder.holds_head, self.stage.holder.peers)
        except LlamadistError as err:
            return err
        return None


def answer(request: pb.StepRequest, out: StepOutput) -> pb.StepReply:
    """The reply to a step whose route ends here (or that had none)."""
    if not request.route:
        return out.to_pb(request_id=request.request_id)
    return out.to_pb(  # one constructor call: a step's answer costs ~5 us, not ~10
        request_id=request.request_id,
        origin=request.origin,
        route_compute_ns=[*request.route_compute_ns, out.compute_ns],
        route_batch_sizes=[*request.route_batch_sizes, out.batch_size],
    )


class _Stream:
    """One ForwardStream call: its outbox, the origins it declared, the batches it submitted."""

    def __init__(
        self,
        streams: StepStreams,
        gone: Callable[[], bool],
        write: Callable[[pb.StepBatchReply], None] | None,
        more: Callable[[], bool] | None = None,
    ):
        self.streams = streams
        self.gone = gone
        self.write = write
        self.more = more
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.origins: list[str] = []
        self.submitted = 0  # batches with steps taken from this stream so far

    def settle(self, messages: list[pb.StepBatchReply]) -> None:
        self.outbox.put((BATCH, self._written(messages)))

    def outlet(self, messages: list[pb.StepBatchReply]) -> None:
        self.outbox.put((OUTLET, self._written(messages)))

    def _written(self, messages: list[pb.StepBatchReply]) -> list[pb.StepBatchReply]:
        """What is left for the serving thread: nothing when this thread writes them."""
        if self.write is None:
            return messages
        try:
            for message in messages:
                self.write(message)
        except LlamadistError:
            pass  # the connection broke: its reader ends the stream
        return []

    def read(self, batches: Iterator[pb.StepBatch]) -> None:
        """The reader thread: takes the caller's batches in until it stops sending."""
        error = None
        try:
            for batch in batches:
                if batch.origin and batch.origin not in self.origins:
                    self.streams.forwarder.open_outlet(batch.origin, self.outlet)
                    self.origins.append(batch.origin)
                if batch.steps:
                    self.submitted += 1
                    alone = self.more is not None and not self.more()
                    self.streams.submit(batch, self.settle, self.gone, alone)
                else:  # a ping, or an origin's declaration: in force once answered
                    self.outlet([pb.StepBatchReply()])
        except Exception as err:  # noqa: BLE001 - a bad message or a broken stream
            error = err
        self.outbox.put((END, error))

    def replies(self, ending: bool) -> Iterator[pb.StepBatchReply]:
        """What the outbox brings, until the stream has ended and its batches are settled."""
        sent = 0  # batches settled
        while not (ending and sent >= self.submitted):
            kind, item = self.outbox.get()
            if kind == END and item is not None:
                if isinstance(item, LlamadistError):
                    raise item
                return  # the caller went away
            if kind in (END, CLOSE):
                ending = True  # the caller stopped sending, or the stage is shutting down
            else:
                yield from item
                sent += kind == BATCH
