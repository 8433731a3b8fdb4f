"""The router: stage links plus the plan in force; sends each step down its route.

A step is one message to the first stage of its route, which forwards its hidden state to the
next stage and so on; the last stage's answer (or the failure of whichever stage failed it)
comes back on the orchestrator's link to that stage (its outlet) and wakes the caller waiting in
`_run_step`. The orchestrator never sees a hidden state. Steps hold the read side of a gate and
a plan reload the write side, so a reload waits for the steps in flight and the steps that
arrive meanwhile wait for the reload. A session whose caches were built under an older plan
epoch, or whose stage failed, is replayed from its token history on its next attempt.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc

from orchestrator.admission import POLL_S, TokenBudget
from orchestrator.decode_stream import DecodeStream
from orchestrator.inflight import InFlight, Pending
from orchestrator.plan import PartitionPlan
from orchestrator.replicas import Position, Replica, ReplicaPool, split_group
from orchestrator.rw_lock import ReadWriteLock
from orchestrator.scheduler import Scheduler, cohorts_for
from orchestrator.stage_client import StageClient
from orchestrator.step_outcome import DraftsIgnored, StageFailed, StepResult, check_alive, outcome
from protos import llamadist_pb2 as pb
from protos.errors import Cancelled, FailedPrecondition, LlamadistError, NotFound, Unavailable
from protos.shared.hop import HopDialer
from protos.shared.layer_range import LayerRange

log = logging.getLogger(__name__)

MAX_FAILOVERS = 8  # attempts of one step across replicas before giving up


def holds(info: pb.StageInfo, layers: LayerRange, epoch: int) -> bool:
    """Whether a stage's Info says it holds `layers` under plan `epoch`."""
    held = (info.layer_start, info.layer_end)
    return info.plan_epoch == epoch and held == (layers.start, layers.end)


def plan_peers(plan: PartitionPlan) -> list[str]:
    """Every stage address of `plan`, replicas too: the only ones its stages forward to."""
    return [address for group in plan.addresses for address in split_group(group)]


class Router:
    def __init__(
        self,
        step_timeout_s: float = 60.0,
        prefill_chunk_tokens: int = 512,
        prefill_tokens_in_flight: int = 2048,
        cohorts: int = 0,
        *,
        reassign: Callable[[int], None],
        before_load: Callable[[StageClient, int, int, pb.StageInfo], object] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        stage_key: str | None = None,
        hop: HopDialer | None = None,
    ):
        """`reassign(epoch)` assigns the plan in force again at an epoch above `epoch` (the
        orchestrator's, which owns plans); `before_load(client, start, end, info)` runs before
        a rejoining replica loads its range (the orchestrator ships the weights it lacks,
        orchestrator.weight_shipping). `cohorts`: decode batches in flight (0: the route's
        devices, scheduler.cohorts_for). `channel_credentials`: mutual TLS toward the stages
        (None = plaintext); `stage_key`: the mesh's stage key, sent on every stage call (None =
        none)."""
        self.step_timeout_s = step_timeout_s
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_budget = TokenBudget(prefill_tokens_in_flight)
        self.cohorts = cohorts
        self.channel_credentials = channel_credentials
        self.stage_key = stage_key
        self.hop = hop  # opens the step links (None: ForwardStream)
        self.plan: PartitionPlan | None = None
        self.origin = uuid.uuid4().hex  # names this orchestrator's outlets on the stages
        self.inflight = InFlight()
        self.scheduler = Scheduler(self.inflight, lambda: self.plan.epoch if self.plan else 0)
        self.pool = ReplicaPool(self._make_client, rejoin=self._rejoin)
        self.reassign = reassign
        self.before_load = before_load
        self._gate = ReadWriteLock()
        self._plan_lock = threading.Lock()  # apply() and rejoins: one layer assignment at a time

    def _make_client(self, address: str) -> StageClient:
        return StageClient(
            address,
            0,
            self.step_timeout_s,
            channel_credentials=self.channel_credentials,
            stage_key=self.stage_key,
            hop=self.hop,
            origin=self.origin,
            on_reply=self.inflight.complete,
            on_broken=self.inflight.fail_through,
        )

    @property
    def addresses(self) -> list[str]:
        """The plan's position addresses (replicas joined by '+')."""
        return [p.group for p in self.pool.positions]

    @property
    def stages(self) -> list[StageClient]:
        """Every replica of the plan in force, in pipeline order."""
        return [r.client for p in self.pool.positions for r in p.replicas]

    def client(self, address: str) -> StageClient:
        return self.pool.replica(address).client

    def infos(
        self, group: str, index: int, timeout_s: float, fingerprint: str
    ) -> list[pb.StageInfo]:
        """Info of every replica of a position that answers within timeout_s (at least one, else
        Unavailable), each checked to serve the same model."""
        infos, errors = [], []
        for address in split_group(group):
            stage = self.client(address)
            stage.index = index
            try:
                stage.wait_ready(timeout_s)
                info = stage.info()
            except Unavailable as err:
                errors.append(str(err))
                continue
            if info.model_fingerprint != fingerprint and not (
                info.fetches_weights and not info.model_fingerprint
            ):  # a stage without a model directory takes the model from the orchestrator
                raise FailedPrecondition(
                    f"{stage.name} serves model {info.model_fingerprint}, the orchestrator "
                    f"{fingerprint}: give every service the same --model"
                )
            infos.append(info)
        if not infos:
            raise Unavailable("; ".join(errors))
        return infos

    def require_plan(self) -> PartitionPlan:
        plan = self.plan
        if plan is None:
            raise FailedPrecondition("the orchestrator has no plan yet; it is waiting for stages")
        return plan

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No step runs while this is held (and none is in flight when it starts)."""
        with self.scheduler.paused(), self._gate.write():
            yield

    def apply(self, plan: PartitionPlan) -> None:
        """Assigns every position its range on each of its replicas; a replica that fails to
        load is marked down (the prober reloads it later), a position with none fails the apply.
        Stages left out of the plan drop their layers. Call inside `exclusive()`."""
        with self._plan_lock:
            old = {r.client.address for p in self.pool.positions for r in p.replicas}
            positions, first_infos = [], []
            for i, (group, layers) in enumerate(zip(plan.addresses, plan.ranges, strict=True)):
                replicas = [self.pool.replica(a) for a in split_group(group)]
                position = Position(i, group, layers, replicas)
                loaded, errors = 0, []
                for replica in replicas:
                    replica.client.index = i
                    log.info(
                        "%s: loading layers %s (epoch %d)", replica.client.name, layers, plan.epoch
                    )
                    try:
                        info = replica.client.load_layers(
                            layers.start, layers.end, plan.epoch, plan_peers(plan)
                        )
                        if loaded == 0:
                            first_infos.append((info, replica.client.address))
                        replica.down_since = None
                        loaded += 1
                    except Unavailable as err:
                        errors.append(str(err))
                        self.pool.mark_down(replica, str(err))
                if not loaded:
                    raise Unavailable(f"{position.name} could not load layers {layers}: {errors}")
                positions.append(position)
            new = {r.client.address for p in positions for r in p.replicas}
            for address in old - new:
                with contextlib.suppress(LlamadistError):  # a stage that is gone holds nothing
                    self.client(address).drop_layers(plan.epoch)
            self.pool.set_positions(positions)
            self.plan = plan
            self.scheduler.set_cohorts(self.cohorts or cohorts_for(first_infos))

    def _rejoin(self, replica: Replica) -> None:
        """A down replica answers again: give it its layers under the plan in force (raises
        while it cannot have them; the prober tries again).

        A stage below our epoch (restarted, or left behind) takes our assignment. A stage at
        or above our epoch that does not hold our assignment was moved by someone else (an
        admin's LoadLayers, a second orchestrator on the same stages): it refuses every epoch
        not above its own, so retrying ours would keep it down for ever. The whole plan is
        assigned again above that epoch instead (steps carry one epoch through every stage of
        a route), and sessions replay onto it as after a reload."""
        info = replica.client.info()
        with self._plan_lock:
            position, plan = self.pool.position_of(replica), self.plan
            if position is None or plan is None:
                return  # no longer in the plan: nothing to load
            layers = position.layers
            if holds(info, layers, plan.epoch):
                return
            if info.plan_epoch < plan.epoch:
                if self.before_load is not None:
                    self.before_load(replica.client, layers.start, layers.end, info)
                replica.client.load_layers(layers.start, layers.end, plan.epoch, plan_peers(plan))
                return
        held = LayerRange(info.layer_start, info.layer_end)
        log.warning(
            "%s holds %s under plan epoch %d, not layers %s under epoch %d: another "
            "orchestrator or an admin's LoadLayers moved it; assigning the plan above it",
            replica.client.name, f"layers {held}" if len(held) > 0 else "no layers",
            info.plan_epoch, layers, plan.epoch,
        )  # fmt: skip
        self.reassign(info.plan_epoch)
        info = replica.client.info()
        with self._plan_lock:
            position, plan = self.pool.position_of(replica), self.plan
            if (
                position is not None
                and plan is not None
                and not holds(info, position.layers, plan.epoch)
            ):
                raise Unavailable(
                    f"{replica.client.name} holds plan epoch {info.plan_epoch}, not the plan's "
                    f"{plan.epoch}, after the plan was assigned again"
                )

    def newest_epoch(self, timeout_s: float = 1.0) -> int:
        """The newest plan epoch any stage of the plan in force holds (of those answering
        within timeout_s), for a plan that must go above them all."""
        epochs = [0]
        for client in self.stages:
            with contextlib.suppress(LlamadistError):
                epochs.append(client.info(timeout_s=timeout_s).plan_epoch)
        return max(epochs)

    def step(
        self,
        session_id: str,
        history: list[int],
        new_tokens: list[int],
        sampling: pb.SamplingParams,
        cached_epoch: int,
        cancelled: threading.Event | None = None,
        draft: list[int] | None = None,
    ) -> StepResult:
        """Runs `new_tokens` after `history` (whose K/V the stages cached under `cached_epoch`;
        0 = nothing cached). Under another epoch, or after a failover to another replica, the
        whole history is replayed first (a step is idempotent: stages cut back to start_pos).
        `draft`: tokens guessed to follow new_tokens, verified by the last stage (the caller's
        history grows by new_tokens and the kept ones only). Raises Cancelled soon after
        `cancelled` is set."""
        with self._gate.read():
            plan = self.require_plan()
            replay = cached_epoch != plan.epoch
            replayed = False
            for _ in range(MAX_FAILOVERS):
                route = self.pool.route(session_id)
                start_pos = 0 if replay else len(history)
                tokens = (history + new_tokens if replay else new_tokens) + (draft or [])
                replayed = replayed or (replay and bool(history))
                try:
                    reply, wall, stage_ns = self._run_chunks(
                        route, plan, session_id, start_pos, tokens, len(draft or []), sampling,
                        cancelled,
                    )  # fmt: skip
                except StageFailed as failed:
                    if isinstance(failed.error, Unavailable | FailedPrecondition):
                        # unreachable, or restarted without its layers: fail over to a replica
                        self.pool.mark_down(failed.replica, str(failed.error))
                    elif not isinstance(failed.error, NotFound):  # NotFound: lost the cache
                        raise failed.error from None
                    replay = True
                    continue
                if draft and reply.draft_tokens != len(draft):
                    raise DraftsIgnored(
                        f"{route[-1].client.name} answered without verifying the drafted "
                        "tokens: it does not verify drafted tokens, or a stage before it does "
                        "not pass them on (stages from before speculative decoding): upgrade "
                        "them, or run the orchestrator with --speculate off"
                    )
                return StepResult(
                    reply.token_id,
                    reply.logprob,
                    wall,
                    plan.epoch,
                    replayed,
                    stage_ns,
                    list(reply.route_batch_sizes),
                    reply.accepted_drafts,
                    list(reply.draft_logprobs),
                )
            raise Unavailable(f"session {session_id!r}: too many stage failures in one step")

    def _run_chunks(self, route, plan, session_id, start_pos, tokens, drafts, sampling, cancelled):
        """Sends `tokens` in steps of at most prefill_chunk_tokens, so that no step holds a
        stage long (the last chunk's reply is the step's); the last `drafts` tokens are drafted
        and all go in the last chunk, with the token before them. Chunks of prompt or replay
        wait for the prefill budget; a decode step (one token, maybe drafts) goes at once."""
        chunk = self.prefill_chunk_tokens
        wall, stage_ns = 0, [0] * len(route)
        addresses = [r.client.address for r in route]
        plain = len(tokens) - drafts
        for offset in range(0, plain, chunk):
            last = offset + chunk >= plain
            piece = tokens[offset:] if last else tokens[offset : offset + chunk]
            request = pb.StepRequest(
                session_id=session_id,
                plan_epoch=plan.epoch,
                start_pos=start_pos + offset,
                token_ids=piece,
                sampling=sampling,
                route=addresses,
                origin=self.origin,
                draft_tokens=drafts if last else 0,
            )
            admitted = (
                self.prefill_budget.hold(len(piece), cancelled)
                if len(piece) - request.draft_tokens > 1
                else contextlib.nullcontext()
            )
            with admitted:
                t0 = time.perf_counter_ns()
                reply = self._run_step(route, request, cancelled)
                wall += time.perf_counter_ns() - t0
            stage_ns = [a + b for a, b in zip(stage_ns, reply.route_compute_ns, strict=True)]
        return reply, wall, stage_ns

    def _run_step(
        self, route: list[Replica], request: pb.StepRequest, cancelled: threading.Event | None
    ) -> pb.StepReply:
        """One step down the route: sent to its first stage, answered by the last one (or by the
        one that failed it). Raises StageFailed naming the replica at fault."""
        links = []
        for replica in route:  # each is this orchestrator's outlet for the answers it gives
            try:
                links.append(replica.client.link())
            except Unavailable as err:
                raise StageFailed(replica, err) from None
        pending = self.inflight.add(tuple(request.route))
        request.request_id = pending.request_id
        try:
            try:
                links[0].send([request])
            except Unavailable as err:
                raise StageFailed(route[0], err) from None
            self._wait(pending, route, cancelled)
        finally:
            self.inflight.forget(pending.request_id)
        return outcome(route, pending)

    def _wait(self, pending: Pending, route: list[Replica], cancelled) -> None:
        """Waits for a step's answer. Silence for step_timeout_s is checked: if every stage of
        the route answers Health SERVING they are busy (a long queue, a long prefill) and the
        wait goes on; one that does not is down (StageFailed). Ends early, with Cancelled, soon
        after `cancelled` is set (the caller is gone)."""
        timeout_s = self.step_timeout_s
        quiet_since = time.monotonic()
        while True:
            wait_s = max(0.0, timeout_s - (time.monotonic() - quiet_since))
            if pending.done.wait(min(wait_s, POLL_S) if cancelled is not None else wait_s):
                return
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("the request was cancelled")
            if time.monotonic() - quiet_since >= timeout_s:
                for replica in route:
                    check_alive(replica, timeout_s)
                quiet_since = time.monotonic()

    def can_stream(self, cached_epoch: int) -> bool:
        """Whether a session whose caches belong to `cached_epoch` may decode by stream."""
        plan = self.plan
        return plan is not None and plan.epoch == cached_epoch

    def decode(
        self,
        session_id: str,
        position: int,
        token: int,
        sampling: pb.SamplingParams,
        epoch: int,
        left: int,
        stop_ids: frozenset[int],
        keep_going: Callable[[], bool],
        cancelled: threading.Event | None = None,
    ) -> DecodeStream:
        """The session's decode steps from `token` at `position` on, made by the scheduler
        loop (at most `left`, ending after a token of `stop_ids`), as StepResults."""
        return DecodeStream(
            self, session_id, position, token, sampling, epoch, left, stop_ids, keep_going,
            cancelled,
        )  # fmt: skip

    def end_session(self, session_id: str) -> int:
        """Frees the session on the stages that served it."""
        route = self.pool.unpin(session_id)
        freed, found = 0, False
        for replica in route:
            if not replica.up:
                continue  # down: it lost the session, and asking would wait for a deadline
            try:
                freed += replica.client.end_session(session_id)
                found = True
            except NotFound:
                continue
            except LlamadistError as err:
                log.warning(
                    "ending session %s: %s", session_id, err, extra={"session_id": session_id}
                )
        if not found:
            raise NotFound(f"session {session_id!r} is not cached on any stage")
        return freed

    def close(self) -> None:
        self.scheduler.close()
        self.pool.close()
