"""The Stage gRPC servicer: protobuf in -> `Stage` call -> protobuf out. Nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import Cancelled, InvalidArgument
from protos.status import grpc_errors
from stage_service.forwarding import check_route
from stage_service.stage import Stage
from stage_service.step_streams import StepStreams
from stage_service.steps import StepInput
from stage_service.weight_cache import Entry


class StageServicer(pb_grpc.StageServicer):
    def __init__(self, stage: Stage, streams: StepStreams, hop_info: dict | None = None):
        """`hop_info`: the StageInfo fields of the stage's hop socket (HopServer.info)."""
        self.stage = stage
        self.streams = streams
        self.hop_info = hop_info or {}

    @grpc_errors
    def Forward(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        if request.route:
            raise InvalidArgument(
                "Forward runs this stage only; a step with a route goes over ForwardStream"
            )
        check_route(request, self.stage.holder.holds_head, self.stage.holder.peers)
        step = StepInput.from_pb(request)
        return self.stage.run_step(step, lambda: not context.is_active()).to_pb()

    @grpc_errors
    def ForwardStream(self, batches, context) -> Iterator[pb.StepBatchReply]:
        """Each batch runs as one where it fits; its steps go on along their routes, and the
        answers come back on this stream or at their origin's outlet (step_streams.py)."""
        yield from self.streams.serve(batches, lambda: not context.is_active())

    @grpc_errors
    def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionReply:
        return pb.EndSessionReply(freed_bytes=self.stage.end_session(request.session_id))

    @grpc_errors
    def Info(self, request: pb.InfoRequest, context) -> pb.StageInfo:
        return pb.StageInfo(**self.stage.info(), **self.hop_info)

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
        return pb.StageInfo(**self.stage.info(), **self.hop_info)

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
