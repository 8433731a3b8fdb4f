"""The router: stage links plus the plan in force; sends each step through the stages in order.

Hidden states pass through as `Tensor` messages, never decoded here. Steps hold the read side of
a gate and a plan reload the write side, so a reload waits for the steps in flight and the steps
that arrive meanwhile wait for the reload. A session whose caches were built under an older plan
epoch is replayed from its token history on its next step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from orchestrator.plan import PartitionPlan
from orchestrator.stage_client import StageClient
from protos import llamadist_pb2 as pb
from protos.errors import FailedPrecondition, LlamadistError, NotFound

log = logging.getLogger(__name__)


class ReadWriteLock:
    """Many readers or one writer; a waiting writer goes before new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class StepResult:
    token_id: int
    logprob: float
    wall_ns: int
    epoch: int  # the plan epoch the session's caches now belong to
    replayed: bool = False
    stage_ns: list[int] = field(default_factory=list)


class Router:
    def __init__(self, step_timeout_s: float = 60.0):
        self.step_timeout_s = step_timeout_s
        self.plan: PartitionPlan | None = None
        self.stages: list[StageClient] = []  # in plan order
        self._clients: dict[str, StageClient] = {}
        self._gate = ReadWriteLock()

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.stages]

    def client(self, address: str) -> StageClient:
        if address not in self._clients:
            self._clients[address] = StageClient(address, len(self._clients), self.step_timeout_s)
        return self._clients[address]

    def infos(self, addresses: list[str], timeout_s: float, fingerprint: str) -> list[pb.StageInfo]:
        """Polls each stage until it answers, and checks it serves the same model."""
        infos = []
        for i, address in enumerate(addresses):
            stage = self.client(address)
            stage.index = i
            stage.wait_ready(timeout_s)
            info = stage.info()
            if info.model_fingerprint != fingerprint:
                raise FailedPrecondition(
                    f"{stage.name} serves model {info.model_fingerprint}, the orchestrator "
                    f"{fingerprint}: give every service the same --model"
                )
            infos.append(info)
        return infos

    def require_plan(self) -> PartitionPlan:
        plan = self.plan
        if plan is None:
            raise FailedPrecondition("the orchestrator has no plan yet; it is waiting for stages")
        return plan

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No step runs while this is held (and none is in flight when it starts)."""
        with self._gate.write():
            yield

    def apply(self, plan: PartitionPlan) -> None:
        """Assigns every stage its range; stages left out of the plan drop their layers.
        Call inside `exclusive()` when steps may be running."""
        stages = [self.client(a) for a in plan.addresses]
        for i, (stage, layers) in enumerate(zip(stages, plan.ranges, strict=True)):
            stage.index = i
            log.info("%s: loading layers %s (epoch %d)", stage.name, layers, plan.epoch)
            stage.load_layers(layers.start, layers.end, plan.epoch)
        for address in set(self.addresses) - set(plan.addresses):
            with contextlib.suppress(LlamadistError):  # a stage that is gone holds nothing
                self._clients[address].load_layers(0, 0, plan.epoch)
        self.stages, self.plan = stages, plan

    def step(
        self,
        session_id: str,
        history: list[int],
        new_tokens: list[int],
        sampling: pb.SamplingParams,
        cached_epoch: int,
    ) -> StepResult:
        """Runs `new_tokens` after `history` (whose K/V the stages cached under `cached_epoch`;
        0 = nothing cached). Under another epoch the whole history is replayed first."""
        with self._gate.read():
            plan = self.require_plan()
            replay = cached_epoch != plan.epoch
            start_pos, tokens = (0, history + new_tokens) if replay else (len(history), new_tokens)
            t0 = time.perf_counter_ns()
            hidden, stage_ns, last = None, [], len(self.stages) - 1
            for i, stage in enumerate(self.stages):
                reply = stage.forward(
                    pb.StepRequest(
                        session_id=session_id,
                        plan_epoch=plan.epoch,
                        start_pos=start_pos,
                        token_ids=tokens,
                        hidden=hidden,
                        sampling=sampling if i == last else None,
                    )
                )
                stage_ns.append(reply.compute_ns)
                hidden = reply.hidden
            wall = time.perf_counter_ns() - t0
        replayed = replay and bool(history)
        return StepResult(reply.token_id, reply.logprob, wall, plan.epoch, replayed, stage_ns)

    def end_session(self, session_id: str) -> int:
        """Frees the session on every stage; stages that never saw it are skipped."""
        freed, found = 0, False
        for stage in list(self.stages):
            try:
                freed += stage.end_session(session_id)
                found = True
            except NotFound:
                continue
            except LlamadistError as err:
                log.warning("ending session %s: %s", session_id, err)
        if not found:
            raise NotFound(f"session {session_id!r} is not cached on any stage")
        return freed

    def close(self) -> None:
        for stage in self._clients.values():
            stage.close()
