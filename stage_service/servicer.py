"""The Stage gRPC servicer: protobuf in -> `Stage` call -> protobuf out. Nothing else."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import grpc

from protos import codec
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import LlamadistError
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
        return self._reply(self.stage.forward(self._step(request)))

    @grpc_errors
    def ForwardStream(self, requests, context) -> Iterator[pb.StepReply]:
        """Steps are read and queued for the compute thread as they arrive; the compute thread
        answers each as soon as its batch is done (no thread waits per step)."""
        replies: queue.SimpleQueue = queue.SimpleQueue()

        def send(request_id: int, reply: pb.StepReply) -> None:
            reply.request_id = request_id
            replies.put(reply)

        def done(job: Job, request_id: int) -> None:  # on the compute thread
            try:
                if job.error is not None:
                    raise job.error
                reply = self._reply(job.out)
            except Exception as err:  # noqa: BLE001 - a failed step is answered, the stream goes on
                reply = self._error_reply(err)
            send(request_id, reply)

        def read() -> None:
            submitted = 0
            try:
                for request in requests:
                    submitted += 1
                    rid = request.request_id
                    try:
                        self.stage.forward_async(
                            self._step(request), lambda job, rid=rid: done(job, rid)
                        )
                    except Exception as err:  # noqa: BLE001 - refused before it was queued
                        send(rid, self._error_reply(err))
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
                yield item
                sent += 1

    @grpc_errors
    def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionReply:
        return pb.EndSessionReply(freed_bytes=self.stage.end_session(request.session_id))

    @grpc_errors
    def Info(self, request: pb.InfoRequest, context) -> pb.StageInfo:
        return pb.StageInfo(**self.stage.info())

    @grpc_errors
    def LoadLayers(self, request: pb.LoadLayersRequest, context) -> pb.StageInfo:
        self.stage.load_layers(request.layer_start, request.layer_end, request.plan_epoch)
        return pb.StageInfo(**self.stage.info())

    @grpc_errors
    def Health(self, request: pb.HealthRequest, context) -> pb.HealthReply:
        ok, detail = self.stage.ready()
        status = pb.HealthReply.SERVING if ok else pb.HealthReply.NOT_SERVING
        return pb.HealthReply(status=status, detail=detail)
