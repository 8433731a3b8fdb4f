"""The Stage gRPC servicer: protobuf in -> `Stage` call -> protobuf out. Nothing else."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from protos import codec
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import Cancelled, InvalidArgument, LlamadistError
from protos.sampling import Sampling
from protos.shared.standard_services import ReadinessHealth
from protos.status import grpc_errors
from stage_service.batcher import Job
from stage_service.forwarding import (
    Forwarder,
    Send,
    check_route,
    error_reply,
    pack,
    routed_onward,
)
from stage_service.stage import Stage, StepInput, StepOutput
from stage_service.weight_cache import Entry

log = logging.getLogger(__name__)


class StageServicer(pb_grpc.StageServicer):
    def __init__(self, stage: Stage, forwarder: Forwarder):
        self.stage = stage
        self.forwarder = forwarder
        self._outboxes: set[queue.SimpleQueue] = set()  # of the ForwardStream calls open now
        self._lock = threading.Lock()
        self.closing = False
        self.health: ReadinessHealth | None = None  # the standard Health service, once served

    def drain(self, deadline: float) -> None:
        """Shutting down: every open ForwardStream ends once the batches it took are settled
        (its caller sees the stream end and fails over), and the links to next stages close,
        so that no peer's stream holds the server up for its whole grace period."""
        if self.health is not None:
            self.health.shutdown()  # grpc.health.v1: NOT_SERVING from now on
        with self._lock:
            self.closing = True
            outboxes = list(self._outboxes)
        for outbox in outboxes:
            outbox.put(("close", None))
        while time.monotonic() < deadline:
            with self._lock:
                if not self._outboxes:
                    break
            time.sleep(0.05)
        self.forwarder.close()

    @staticmethod
    def _step(request: pb.StepRequest) -> StepInput:
        return StepInput(
            session_id=request.session_id,
            plan_epoch=request.plan_epoch,
            start_pos=request.start_pos,
            token_ids=list(request.token_ids),
            hidden=codec.from_pb(request.hidden) if request.HasField("hidden") else None,
            sampling=Sampling.from_pb(request.sampling),
            return_logits=request.return_logits,
            draft_tokens=request.draft_tokens,
        )

    @staticmethod
    def _reply(out: StepOutput) -> pb.StepReply:
        reply = pb.StepReply(
            token_id=out.token_id,
            logprob=out.logprob,
            compute_ns=out.compute_ns,
            batch_size=out.batch_size,
            draft_tokens=out.draft_tokens,
            accepted_drafts=out.accepted_drafts,
            draft_logprobs=out.draft_logprobs,
        )
        if out.hidden is not None:
            reply.hidden.CopyFrom(codec.to_pb(out.hidden))
        if out.logits is not None:
            reply.logits.CopyFrom(codec.to_pb(out.logits))
        return reply

    @grpc_errors
    def Forward(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        if request.route:
            raise InvalidArgument(
                "Forward runs this stage only; a step with a route goes over ForwardStream"
            )
        check_route(request, self.stage.holds_head, self.stage.peers)
        step = self._step(request)
        return self._reply(self.stage.forward(step, lambda: not context.is_active()))

    def _submit_batch(
        self, batch: pb.StepBatch, settle: Send, cancelled: Callable[[], bool]
    ) -> None:
        """Queues a batch's steps together (one forward where they fit). When all are done (on
        the compute thread, or here when none could be queued), each goes on to the next stage
        of its route or is answered (forwarding.Forwarder). `settle` gets, once per batch, the
        answers that go back on the batch's own stream (maybe none)."""
        requests = list(batch.steps)
        answers: list[pb.StepReply | None] = [None] * len(requests)  # None: forwarded
        steps, queued = [], []
        for i, request in enumerate(requests):
            try:
                check_route(request, self.stage.holds_head, self.stage.peers)
                steps.append(self._step(request))
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
                        routed_onward(request, out.hidden, out.compute_ns, out.batch_size)
                    )
                else:
                    answers[i] = self._answer(request, job.out)
            given = [a for a in answers if a is not None] + self.forwarder.forward(onward)
            # unrouted steps are answered here, in the batch's order; routed ones at their
            # origin's outlet, or here when this stage holds none
            here = [a for a in given if not a.origin]
            here += self.forwarder.deliver([a for a in given if a.origin])
            settle(pack(here))

        try:
            self.stage.forward_many(steps, done, cancelled)
        except Exception as err:  # noqa: BLE001 - no layers, shutting down: every step fails
            for i in queued:
                answers[i] = error_reply(requests[i], err, requests[i].hop)
            queued.clear()
            done([])

    def _answer(self, request: pb.StepRequest, out: StepOutput) -> pb.StepReply:
        reply = self._reply(out)
        reply.request_id = request.request_id
        if request.route:
            reply.origin = request.origin
            reply.route_compute_ns.extend([*request.route_compute_ns, out.compute_ns])
            reply.route_batch_sizes.extend([*request.route_batch_sizes, out.batch_size])
        return reply

    @grpc_errors
    def ForwardStream(self, batches, context) -> Iterator[pb.StepBatchReply]:
        """A reader thread queues each batch for the compute thread as it arrives; this thread
        writes what is put on `outbox`: each batch's answers given on this stream (one list per
        batch, maybe empty), and, once the stream declared an origin, that origin's answers from
        other links. It ends when the caller has stopped sending and every batch is settled."""
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        origins: list[str] = []
        submitted = [0]  # batches with steps taken from this stream so far

        def gone() -> bool:  # the caller closed the stream: drop what it queued
            return not context.is_active()

        def settled(messages: list[pb.StepBatchReply]) -> None:
            outbox.put(("settled", messages))

        def extra(messages: list[pb.StepBatchReply]) -> None:
            outbox.put(("extra", messages))

        def read() -> None:
            try:
                for batch in batches:
                    if batch.origin and batch.origin not in origins:
                        self.forwarder.open_outlet(batch.origin, extra)
                        origins.append(batch.origin)
                    if batch.steps:
                        submitted[0] += 1
                        self._submit_batch(batch, settled, gone)
                    else:  # a ping, or an origin's declaration: in force once answered
                        extra([pb.StepBatchReply()])
            except Exception as err:  # noqa: BLE001 - a bad message or a broken stream
                outbox.put(("error", err))
            outbox.put(("end", None))

        with self._lock:
            self._outboxes.add(outbox)
            ending = self.closing
        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        sent = 0
        try:
            while not (ending and sent >= submitted[0]):
                kind, item = outbox.get()
                if kind in ("end", "close"):
                    ending = True  # the caller stopped sending, or the stage is shutting down
                elif kind == "error":
                    if isinstance(item, LlamadistError):
                        raise item
                    return  # the caller went away
                else:
                    yield from item
                    sent += kind == "settled"
        finally:
            with self._lock:
                self._outboxes.discard(outbox)
            for origin in origins:
                self.forwarder.close_outlet(origin, extra)

    @grpc_errors
    def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionReply:
        return pb.EndSessionReply(freed_bytes=self.stage.end_session(request.session_id))

    @grpc_errors
    def Info(self, request: pb.InfoRequest, context) -> pb.StageInfo:
        return pb.StageInfo(**self.stage.info())

    @grpc_errors
    def LoadLayers(self, request: pb.LoadLayersRequest, context) -> pb.StageInfo:
        if request.hold_nothing:
            if request.layer_start or request.layer_end:
                raise InvalidArgument("hold_nothing takes no layer range (leave both at 0)")
            self.stage.drop_layers(request.plan_epoch)
        else:
            self.stage.load_layers(
                request.layer_start,
                request.layer_end,
                request.plan_epoch,
                frozenset(request.peer_addresses),
            )
        return pb.StageInfo(**self.stage.info())

    @grpc_errors
    def Health(self, request: pb.HealthRequest, context) -> pb.HealthReply:
        ok, detail = self.stage.ready()
        status = pb.HealthReply.SERVING if ok else pb.HealthReply.NOT_SERVING
        return pb.HealthReply(status=status, detail=detail)

    @grpc_errors
    def OfferWeights(self, request: pb.WeightManifest, context) -> pb.WeightNeeds:
        entries = [
            Entry(t.name, t.sha256, t.size_bytes, tuple(t.shape), t.dtype) for t in request.tensors
        ]
        answer = self.stage.offer_weights(request.model_fingerprint, request.config_json, entries)
        return pb.WeightNeeds(
            needs=[pb.WeightNeed(sha256=s, have_bytes=h) for s, h in answer.needs.items()],
            cached_bytes=answer.cached_bytes,
            discarded_bytes=answer.discarded_bytes,
        )

    @grpc_errors
    def PutWeights(self, request_iterator, context) -> pb.WeightsReceived:
        def chunks():
            try:
                for c in request_iterator:
                    yield c.sha256, c.offset, c.data
            except grpc.RpcError:  # gRPC's word for a stream its caller ended early
                raise Cancelled(
                    "the weights stream was cut before it ended (the orchestrator stopped it, "
                    "or the link broke)"
                ) from None

        written, completed = self.stage.receive_weights(chunks())
        return pb.WeightsReceived(bytes=written, completed=completed)
