"""The router: stage links plus the plan in force; sends each step through the stages in order.

Hidden states pass through as `Tensor` messages, never decoded here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from orchestrator.plan import PartitionPlan
from orchestrator.stage_client import StageClient
from protos import llamadist_pb2 as pb
from protos.errors import FailedPrecondition, LlamadistError, NotFound

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    token_id: int
    logprob: float
    wall_ns: int
    stage_ns: list[int] = field(default_factory=list)


class Router:
    def __init__(self, addresses: list[str], step_timeout_s: float = 60.0):
        self.stages = [StageClient(a, i, step_timeout_s) for i, a in enumerate(addresses)]
        self.plan: PartitionPlan | None = None
        self._lock = threading.Lock()

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.stages]

    def wait_for_stages(self, timeout_s: float, fingerprint: str) -> list[pb.StageInfo]:
        """Polls every stage until it answers, and checks it serves the same model."""
        infos = []
        for stage in self.stages:
            stage.wait_ready(timeout_s)
            info = stage.info()
            if info.model_fingerprint != fingerprint:
                raise FailedPrecondition(
                    f"{stage.name} serves model {info.model_fingerprint}, the orchestrator "
                    f"{fingerprint}: give every service the same --model"
                )
            infos.append(info)
        return infos

    def apply(self, plan: PartitionPlan) -> None:
        """Assigns every stage its range of the plan."""
        if list(plan.addresses) != self.addresses:
            raise FailedPrecondition("the plan names other stages than the router holds")
        for stage, layers in zip(self.stages, plan.ranges, strict=True):
            log.info("%s: loading layers %s (epoch %d)", stage.name, layers, plan.epoch)
            stage.load_layers(layers.start, layers.end, plan.epoch)
        with self._lock:
            self.plan = plan

    def require_plan(self) -> PartitionPlan:
        plan = self.plan
        if plan is None:
            raise FailedPrecondition("the orchestrator has no plan yet; it is waiting for stages")
        return plan

    def step(
        self,
        session_id: str,
        start_pos: int,
        token_ids: list[int],
        sampling: pb.SamplingParams,
    ) -> StepResult:
        plan = self.require_plan()
        t0 = time.perf_counter_ns()
        hidden = None
        stage_ns = []
        for i, stage in enumerate(self.stages):
            request = pb.StepRequest(
                session_id=session_id,
                plan_epoch=plan.epoch,
                start_pos=start_pos,
                token_ids=token_ids,
                hidden=hidden,
                sampling=sampling if i == len(self.stages) - 1 else None,
            )
            reply = stage.forward(request)
            stage_ns.append(reply.compute_ns)
            hidden = reply.hidden
        wall = time.perf_counter_ns() - t0
        return StepResult(reply.token_id, reply.logprob, wall, stage_ns)

    def end_session(self, session_id: str) -> int:
        """Frees the session on every stage; stages that never saw it are skipped."""
        freed, found = 0, False
        for stage in self.stages:
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
        for stage in self.stages:
            stage.close()
