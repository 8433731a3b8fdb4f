"""The Stage gRPC servicer: protobuf in -> `Stage` call -> protobuf out. Nothing else."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from protos import codec
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import InvalidArgument, LlamadistError
from protos.limits import MAX_BATCH_BYTES, split_by_size
from protos.sampling import Sampling
from protos.status import code_of, grpc_errors
from stage_service.batcher import Job
from stage_service.stage import Stage, StepInput, StepOutput

log = logging.getLogger(__name__)


class StageServicer(pb_grpc.StageServicer):
    def __init__(self, stage: Stage):
        self.stage = stage

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
        )

    @staticmethod
    def _reply(out: StepOutput) -> pb.StepReply:
        reply = pb.StepReply(
            token_id=out.token_id,
            logprob=out.logprob,
            compute_ns=out.compute_ns,
            batch_size=out.batch_size,
        )
        if out.hidden is not None:
            reply.hidden.CopyFrom(codec.to_pb(out.hidden))
        if out.logits is not None:
            reply.logits.CopyFrom(codec.to_pb(out.logits))
        return reply

    @staticmethod
    def _error_reply(err: BaseException) -> pb.StepReply:
        if not isinstance(err, LlamadistError):
            log.error("internal error in a streamed step: %r", err)
        return pb.StepReply(error_code=code_of(err).value[0], error_message=str(err))

    @grpc_errors
    def Forward(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        step = self._step(request)
        return self._reply(self.stage.forward(step, lambda: not context.is_active()))

    def _submit_batch(
        self,
        batch: pb.StepBatch,
        send: Callable[[list[pb.StepBatchReply]], None],
        cancelled: Callable[[], bool],
    ) -> None:
        """Queues a batch's steps together; `send` gets its reply messages when all are done (on
        the compute thread, or here when none could be queued). Every step fails on its own."""
        requests = batch.steps
        replies: list[pb.StepReply | None] = [None] * len(requests)
        steps, slots = [], []
        for i, request in enumerate(requests):
            try:
                steps.append(self._step(request))
                slots.append(i)
            except Exception as err:  # noqa: BLE001 - a step that does not decode
                replies[i] = self._error_reply(err)

        def done(jobs: list[Job]) -> None:
            for i, job in zip(slots, jobs, strict=True):
                try:
                    if job.error is not None:
                        raise job.error
                    replies[i] = self._reply(job.out)
                except Exception as err:  # noqa: BLE001 - a failed step is answered
                    replies[i] = self._error_reply(err)
            for reply, request in zip(replies, requests, strict=True):
                reply.request_id = request.request_id
            # replies carry hidden states, often larger than their requests (the first stage
            # gets token ids): as many messages as keep each under the limit
            groups = split_by_size(replies, MAX_BATCH_BYTES)
            send([pb.StepBatchReply(replies=g) for g in groups] or [pb.StepBatchReply()])

        try:
            self.stage.forward_many(steps, done, cancelled)
        except Exception as err:  # noqa: BLE001 - no layers, shutting down: every step fails
            for i in slots:
                replies[i] = self._error_reply(err)
            slots.clear()
            done([])

    @grpc_errors
    def ForwardStream(self, batches, context) -> Iterator[pb.StepBatchReply]:
        """Batches are read and queued for the compute thread as they arrive (a reader thread);
        the compute thread hands each batch's reply to this one to send as soon as the batch is
        done (no thread waits per step)."""
        replies: queue.SimpleQueue = queue.SimpleQueue()

        def gone() -> bool:  # the orchestrator closed the stream: drop what it queued
            return not context.is_active()

        def read() -> None:
            submitted = 0
            try:
                for batch in batches:
                    submitted += 1
                    self._submit_batch(batch, replies.put, gone)
            except Exception as err:  # noqa: BLE001 - a bad message or a broken stream
                replies.put(err)
            replies.put(submitted)  # the end marker: how many replies to wait for

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        sent, total = 0, None
        while total is None or sent < total:
            item = replies.get()
            if isinstance(item, int):
                total = item
            elif isinstance(item, Exception):
                if isinstance(item, LlamadistError):
                    raise item
                return  # the caller went away
            else:
                yield from item  # one batch's reply messages
                sent += 1

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
            self.stage.load_layers(request.layer_start, request.layer_end, request.plan_epoch)
        return pb.StageInfo(**self.stage.info())

    @grpc_errors
    def Health(self, request: pb.HealthRequest, context) -> pb.HealthReply:
        ok, detail = self.stage.ready()
        status = pb.HealthReply.SERVING if ok else pb.HealthReply.NOT_SERVING
        return pb.HealthReply(status=status, detail=detail)
