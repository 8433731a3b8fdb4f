"""The Orchestrator gRPC servicer: protobuf in -> `Orchestrator` call -> protobuf out."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from orchestrator.generation import Caller, Chunk, Timings
from orchestrator.orchestrator import Orchestrator, PlanRequest, PlanView
from orchestrator.replicas import split_group
from orchestrator.session_state import GenerationRequest
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import InvalidArgument, LlamadistError, Unauthenticated
from protos.limits import DEFAULT_MAX_NEW_TOKENS, check_session_id
from protos.shared.security import ApiKeyInterceptor
from protos.status import grpc_errors

FINISH = {"eos": pb.EOS, "length": pb.LENGTH, "stop": pb.STOP, "": pb.FINISH_REASON_UNSPECIFIED}


def timings_to_pb(t: Timings, addresses: list[str]) -> pb.Timings:
    return pb.Timings(
        ttft_ms=t.ttft_ms,
        decode_tokens_per_s=t.decode_tokens_per_s,
        total_ms=t.total_ms,
        hop_overhead_ms=t.hop_overhead_ms,
        mesh_overhead_ms=t.mesh_overhead_ms,
        replays=t.replays,
        trips=t.trips,
        drafted_tokens=t.drafted_tokens,
        accepted_tokens=t.accepted_tokens,
        cohorts=t.cohorts,
        stages=[
            pb.StageTiming(address=a, compute_ms=ms, steps=t.trips, mean_batch_size=b)
            for a, ms, b in zip(addresses, t.stage_compute_ms, t.stage_mean_batch, strict=True)
        ],
    )


def caller_of(context: grpc.ServicerContext, keys: ApiKeyInterceptor | None) -> Caller:
    """Who calls: with API keys, the key (hashed, never kept in the clear; the interceptor has
    already refused unknown ones), which owns the sessions it starts; without keys, the peer's
    host (a header anyone can vary would let a client dodge its session cap)."""
    if keys is not None:
        identified = keys.identify(context.invocation_metadata())
        if identified is None:  # the interceptor refuses these first; never a shared identity
            raise Unauthenticated("missing or unknown API key")
        key_id, role = identified
        return Caller(key_id, owns_all=role == "admin")
    peer = context.peer() or ""  # "ipv4:127.0.0.1:50512" / "ipv6:[::1]:50512"
    return Caller("host:" + peer.rsplit(":", 1)[0], owns_all=True)


def cancelled_with(context: grpc.ServicerContext) -> threading.Event:
    """An event set when the call ends for any reason: its client cancelled, its deadline
    passed, its connection dropped (or it completed)."""
    event = threading.Event()
    if not context.add_callback(event.set):
        event.set()  # already over
    return event


def plan_request_from_pb(msg: pb.PlanRequest) -> PlanRequest:
    return PlanRequest(
        strategy=msg.strategy,
        num_partitions=msg.num_partitions,
        max_memory=msg.max_memory,
        boundaries=msg.boundaries,
        stages=tuple(msg.stages),
    )


def plan_to_pb(view: PlanView) -> pb.Plan:
    plan = view.plan
    last = plan.num_stages - 1
    return pb.Plan(
        epoch=plan.epoch,
        strategy=plan.strategy,
        num_layers=plan.num_layers,
        stages=[
            pb.StagePlan(
                index=i,
                address=address,
                layer_start=layers.start,
                layer_end=layers.end,
                has_embeddings=i == 0,
                has_head=i == last,
                device=est.device,
                weight_bytes=est.weight_bytes,
                kv_capacity_tokens=est.kv_capacity_tokens,
                est_ms_per_token=est.ms_per_token,
                quantize=est.quantize,
                fetch_bytes=est.fetch_bytes,
                fetch_seconds=est.fetch_seconds,
            )
            for i, (address, layers, est) in enumerate(
                zip(plan.addresses, plan.ranges, view.stages, strict=True)
            )
        ],
        max_context=view.max_context,
    )


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    def __init__(self, orchestrator: Orchestrator, keys: ApiKeyInterceptor | None = None):
        self.orch = orchestrator
        self.keys = keys  # the API key check in force, None without keys

    def _request(self, msg: pb.GenerateRequest) -> GenerationRequest:
        self.orch.require_ready()
        if msg.session_id and self.orch.generator.is_suspended(msg.session_id):
            return GenerationRequest(prompt_ids=[], session_id=msg.session_id)  # a resume
        tok, max_tokens = self.orch.tokenizer, self.orch.generator.max_positions
        kind = msg.WhichOneof("input")
        if kind == "prompt":
            ids = tok.encode(msg.prompt, max_tokens)
        elif kind == "token_ids":
            ids = list(msg.token_ids.ids)
        elif kind == "chat":
            chat = [{"role": m.role, "content": m.content} for m in msg.chat.messages]
            ids = tok.encode_chat(chat, max_tokens)
        else:
            raise InvalidArgument("the request has no input: set prompt, token_ids or chat")
        return GenerationRequest(
            prompt_ids=ids,
            max_new_tokens=msg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            sampling=self.orch.with_defaults(msg.sampling),
            stop=tuple(msg.stop),
            ignore_eos=msg.ignore_eos,
            session_id=msg.session_id,
            speculate=msg.speculate,
        )

    def _chunk_to_pb(self, c: Chunk) -> pb.GenerateChunk:
        out = pb.GenerateChunk(
            token_ids=c.token_ids,
            logprobs=c.logprobs,
            text=c.text,
            finish_reason=FINISH[c.finish_reason],
            session_id=c.session_id,
        )
        if c.timings is not None:
            out.timings.CopyFrom(timings_to_pb(c.timings, self.orch.router.addresses))
        return out

    @grpc_errors
    def GenerateStream(self, request: pb.GenerateRequest, context) -> Iterator[pb.GenerateChunk]:
        with self.orch.metrics.refusals():
            req = self._request(request)
        caller, cancelled = caller_of(context, self.keys), cancelled_with(context)
        for chunk in self.orch.generator.run(req, caller, cancelled):
            yield self._chunk_to_pb(chunk)

    @grpc_errors
    def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateReply:
        with self.orch.metrics.refusals():
            req = self._request(request)
        reply = pb.GenerateReply()
        caller, cancelled = caller_of(context, self.keys), cancelled_with(context)
        for chunk in self.orch.generator.run(req, caller, cancelled):
            reply.text += chunk.text
            reply.token_ids.extend(chunk.token_ids)
            reply.logprobs.extend(chunk.logprobs)
            reply.session_id = chunk.session_id
            reply.prompt_tokens = chunk.prompt_tokens
            if chunk.finish_reason:
                reply.finish_reason = FINISH[chunk.finish_reason]
                reply.timings.CopyFrom(timings_to_pb(chunk.timings, self.orch.router.addresses))
        return reply

    @grpc_errors
    def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionReply:
        check_session_id(request.session_id)
        freed = self.orch.generator.end(request.session_id, caller_of(context, self.keys))
        return pb.EndSessionReply(freed_bytes=freed)

    @grpc_errors
    def GetPlan(self, request: pb.GetPlanRequest, context) -> pb.Plan:
        self.orch.require_ready()
        return plan_to_pb(self.orch.view)

    @grpc_errors
    def PreviewPlan(self, request: pb.PlanRequest, context) -> pb.Plan:
        return plan_to_pb(self.orch.preview(plan_request_from_pb(request)))

    @grpc_errors
    def ReloadPlan(self, request: pb.PlanRequest, context) -> pb.Plan:
        return plan_to_pb(self.orch.reload(plan_request_from_pb(request)))

    @grpc_errors
    def ListStages(self, request: pb.ListStagesRequest, context) -> pb.ListStagesReply:
        reply = pb.ListStagesReply()
        router = self.orch.router
        stages = router.stages or [
            router.client(a) for g in self.orch.config.stages for a in split_group(g)
        ]
        listed = {s.address for s in stages}
        # a stage of a plan being loaded, taking its weights now
        stages += [router.client(a) for a in list(self.orch.shipper.transfers) if a not in listed]
        for stage in stages:
            status = reply.stages.add(address=stage.address)
            transfer = self.orch.shipper.transfers.get(stage.address)
            if transfer is not None:
                status.transfer = transfer.text()
            try:
                status.info.CopyFrom(stage.info())
                status.reachable = True
            except LlamadistError as err:
                status.error = str(err)
        return reply

    @grpc_errors
    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        ok, detail = self.orch.ready()
        status = pb.HealthReply.SERVING if ok else pb.HealthReply.NOT_SERVING
        return pb.HealthReply(status=status, detail=detail)
