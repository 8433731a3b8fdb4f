"""The steps the orchestrator has sent and waits for, by request id.

A step goes in at the first stage of its route and its answer comes out at another (the last
stage, or one that failed it), on that stage's link: every link's reader hands what arrives to
`complete`, and a link that breaks fails, through `fail_through`, every step whose route runs
through that stage. The first outcome of a step stands; later ones are dropped.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass

from protos import llamadist_pb2 as pb
from protos.errors import LlamadistError


@dataclass
class Pending:
    request_id: int
    route: tuple[str, ...]  # stage addresses, in order
    reply: pb.StepReply | None = None
    broken_hop: int = -1  # the hop whose link broke, with `error`
    error: LlamadistError | None = None
    on_done: Callable[[Pending], None] | None = None  # called once settled, where it settles
    # set once settled; only a step without on_done has one (a waiter's: ~5 us to make)
    done: threading.Event | None = None

    def settle(self) -> None:
        if self.done is not None:
            self.done.set()
        if self.on_done is not None:
            self.on_done(self)


class InFlight:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._lock = threading.Lock()

    def add(
        self, route: tuple[str, ...], on_done: Callable[[Pending], None] | None = None
    ) -> Pending:
        with self._lock:
            done = threading.Event() if on_done is None else None
            pending = Pending(next(self._ids), route, on_done=on_done, done=done)
            self._pending[pending.request_id] = pending
        return pending

    def forget(self, request_id: int) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def complete(self, reply: pb.StepReply) -> None:
        with self._lock:
            pending = self._pending.pop(reply.request_id, None)
        if pending is not None:
            pending.reply = reply
            pending.settle()

    def fail(self, request_id: int, hop: int, error: LlamadistError) -> None:
        """The step could not be sent to the stage at `hop` of its route."""
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.broken_hop, pending.error = hop, error
            pending.settle()

    def fail_through(self, address: str, error: LlamadistError) -> None:
        """The link to `address` broke: every step routed through it fails with `error`."""
        with self._lock:
            hit = [p for p in self._pending.values() if address in p.route]
            for pending in hit:
                del self._pending[pending.request_id]
        for pending in hit:
            pending.broken_hop, pending.error = pending.route.index(address), error
            pending.settle()
