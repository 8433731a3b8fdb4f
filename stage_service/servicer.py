"""The Stage gRPC servicer: protobuf in -> `Stage` call -> protobuf out. Nothing else."""

from __future__ import annotations

import grpc

from protos import codec
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.sampling import Sampling
from protos.status import grpc_errors
from stage_service.stage import Stage, StepInput


class StageServicer(pb_grpc.StageServicer):
    def __init__(self, stage: Stage):
        self.stage = stage

    @grpc_errors
    def Forward(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        step = StepInput(
            session_id=request.session_id,
            plan_epoch=request.plan_epoch,
            start_pos=request.start_pos,
            token_ids=list(request.token_ids),
            hidden=codec.from_pb(request.hidden) if request.HasField("hidden") else None,
            sampling=Sampling.from_pb(request.sampling),
            return_logits=request.return_logits,
        )
        out = self.stage.forward(step)
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
