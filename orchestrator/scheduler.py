"""The scheduler loop: which decode steps go down the mesh together.

Every decoding session is a member of one cohort. A cohort goes as one batch: the loop waits
until each of its members has queued its next step (a member that missed a tick, busy with a
replay or gone quiet, is not waited for again until it queues), or until the oldest queued step
has waited `max_wait_s`, and then sends the cohort's steps, one StepBatch per first-stage link.
Sessions join a cohort when they start decoding and leave when they finish, between ticks.

How many cohorts: one when the stages of the route share a device (a batch of every session
reads the weights once per token); as many as the route has devices when they are separate (a
cohort per stage keeps every stage busy). `cohorts_for` decides from the stages' Info.

The session's own thread prepares its step (draft, history) and consumes its answer (text, stop
strings); only this loop sends decode steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from protos import llamadist_pb2 as pb
from protos.errors import LlamadistError
from protos.shared.step_link import StepLink

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.002  # the longest a queued step waits for the rest of its cohort


def cohorts_for(stages: list[tuple[pb.StageInfo, str]]) -> int:
    """Cohorts in flight for a route of (Info, address): its distinct devices. Stages on a GPU
    of one host share it; CPU stages own their threads' cores (--threads), so each is a device
    of its own."""
    devices = set()
    for i, (info, address) in enumerate(stages):
        host = address.rsplit(":", 1)[0]
        devices.add((host, info.device) if info.device.startswith("cuda") else i)
    return max(1, len(devices))


@dataclass
class _Queued:
    link: StepLink
    request: pb.StepRequest
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Cohort:
    members: set[str] = field(default_factory=set)
    late: set[str] = field(default_factory=set)  # members not waited for until they queue
    queued: dict[str, _Queued] = field(default_factory=dict)

    def due(self, now: float, max_wait_s: float) -> bool:
        if not self.queued:
            return False
        waited_for = self.members - self.late
        if waited_for <= self.queued.keys():
            return True
        return now - min(q.at for q in self.queued.values()) >= max_wait_s


class Scheduler:
    def __init__(
        self,
        on_send_failed: Callable[[pb.StepRequest, LlamadistError], None],
        max_wait_s: float = MAX_WAIT_S,
    ):
        """`on_send_failed(request, error)`: a queued step could not go on its link (it broke
        meanwhile); its sender learns it there (the router's in-flight table)."""
        self.on_send_failed = on_send_failed
        self.max_wait_s = max_wait_s
        self.cohorts: list[_Cohort] = [_Cohort()]
        self._cohort_of: dict[str, _Cohort] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.ticks = 0
        self.sent_steps = 0
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def set_cohorts(self, n: int) -> None:
        """Spreads the members over `n` cohorts (a plan's route decides how many pay)."""
        with self._cond:
            if n == len(self.cohorts):
                return
            members = [s for c in self.cohorts for s in c.members]
            queued = {s: q for c in self.cohorts for s, q in c.queued.items()}
            self.cohorts = [_Cohort() for _ in range(max(1, n))]
            self._cohort_of.clear()
            for session_id in members:
                self._place(session_id)
            for session_id, q in queued.items():
                self._cohort_of[session_id].queued[session_id] = q
            self._cond.notify()

    @contextmanager
    def member(self, session_id: str) -> Iterator[None]:
        """The block in which a session decodes: its steps go with its cohort's."""
        with self._cond:
            self._place(session_id)
        try:
            yield
        finally:
            with self._cond:
                cohort = self._cohort_of.pop(session_id, None)
                if cohort is not None:
                    cohort.members.discard(session_id)
                    cohort.late.discard(session_id)
                self._cond.notify()

    def send(self, session_id: str, link: StepLink, request: pb.StepRequest) -> None:
        """Queues a member's decode step for its cohort's next batch (a session that is no
        member goes at once, raising what the link raises)."""
        with self._cond:
            cohort = self._cohort_of.get(session_id)
            if cohort is not None:
                cohort.queued[session_id] = _Queued(link, request)
                cohort.late.discard(session_id)
                self._cond.notify()
                return
        link.send([request])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _place(self, session_id: str) -> None:
        cohort = min(self.cohorts, key=lambda c: len(c.members))
        cohort.members.add(session_id)
        self._cohort_of[session_id] = cohort

    def _loop(self) -> None:
        while True:
            with self._cond:
                due = self._wait_for_due()
                if due is None:
                    return
                batches = []
                for cohort in due:
                    missing = cohort.members - cohort.late - cohort.queued.keys()
                    cohort.late |= missing  # not waited for until they queue again
                    batches.append(list(cohort.queued.values()))
                    cohort.queued.clear()
                self.ticks += 1
            for batch in batches:
                try:
                    self._send(batch)
                except Exception:  # a bug here must not stop every session's steps
                    log.exception("sending a cohort failed")

    def _wait_for_due(self) -> list[_Cohort] | None:
        """The cohorts due now (waits until one is); None once closed."""
        while not self._closed:
            now = time.monotonic()
            due = [c for c in self.cohorts if c.due(now, self.max_wait_s)]
            if due:
                return due
            oldest = [q.at for c in self.cohorts for q in c.queued.values()]
            timeout = max(0.0, min(oldest) + self.max_wait_s - now) if oldest else None
            self._cond.wait(timeout)
        return None

    def _send(self, batch: list[_Queued]) -> None:
        """One message per first-stage link (replicas of the first position get their own)."""
        by_link: dict[int, list[_Queued]] = {}
        for q in batch:
            by_link.setdefault(id(q.link), []).append(q)
        for group in by_link.values():
            try:
                group[0].link.send([q.request for q in group])
            except LlamadistError as err:
                for q in group:
                    self.on_send_failed(q.request, err)
            self.sent_steps += len(group)
