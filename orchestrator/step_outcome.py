"""What a step comes to, for the router and its decode streams: a StepResult, or StageFailed
naming the replica at fault (the caller marks it down and fails over), and the check that
tells a busy stage from a dead one when a step goes unanswered."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from orchestrator.inflight import Pending
from orchestrator.replicas import Replica
from protos import llamadist_pb2 as pb
from protos.errors import FailedPrecondition, LlamadistError, NotFound, Unavailable
from protos.shared.step_link import reply_error

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0  # a silent stage must answer Health within this to count as busy


@dataclass
class StepResult:
    token_id: int
    logprob: float
    wall_ns: int
    epoch: int  # the plan epoch the session's caches now belong to
    replayed: bool = False
    stage_ns: list[int] = field(default_factory=list)
    stage_batch: list[int] = field(default_factory=list)  # each stage's batch, last chunk
    accepted_drafts: int = 0  # a step with drafts: the leading ones kept (token_id follows)
    draft_logprobs: list[float] = field(default_factory=list)


def outcome(route: list[Replica], pending: Pending) -> pb.StepReply:
    """A settled step's reply, or StageFailed naming the replica at fault."""
    if pending.error is not None:  # a link of the route broke
        raise StageFailed(route[pending.broken_hop], pending.error)
    reply = pending.reply
    hop = reply.failed_hop if 0 <= reply.failed_hop < len(route) else 0
    error = reply_error(reply, route[hop].client.name)
    if error is None:
        if len(reply.route_compute_ns) != len(route):
            raise Unavailable(f"{route[-1].client.name} answered a step without its timings")
        return reply
    if isinstance(error, Unavailable | FailedPrecondition | NotFound):
        raise StageFailed(route[hop], error)
    raise error


def check_alive(replica: Replica, timeout_s: float) -> None:
    try:
        serving, detail = replica.client.health(timeout_s=HEALTH_TIMEOUT_S)
    except LlamadistError as err:
        serving, detail = False, str(err)
    if not serving:
        raise StageFailed(
            replica,
            Unavailable(
                f"{replica.client.name}: a step got no answer within {timeout_s:.0f} s and "
                f"the stage is not serving ({detail})"
            ),
        )
    log.info("%s is busy: no answer to a step for %.0f s", replica.client.name, timeout_s)


class DraftsIgnored(FailedPrecondition):
    """The last stage answered a step with drafts as an ordinary one (its token follows every
    input token, drafts included): it predates verification. The caller retries the step
    without drafts (its start position cuts them out of the caches)."""


class StageFailed(Exception):
    """A step failed at `replica` (marked down by the caller where the stage is at fault)."""

    def __init__(self, replica: Replica, error: LlamadistError):
        self.replica = replica
        self.error = error
