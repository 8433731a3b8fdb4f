"""Pipeline positions and their replicas: which stage serves a session at each position, which
stages are down, and the prober that brings them back.

A position's address may join replicas with '+' ("10.0.0.1:7001+10.0.0.2:7001"). Each session
is pinned to one live replica per position (the least loaded when it is first routed). A replica
that fails is marked down; a background prober retries it with exponential backoff and, once it
answers, has the router give it its layers for the plan in force (the whole plan goes to a newer
epoch when someone else moved the stage to one: Router._rejoin) and marks it up again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.stage_client import StageClient
from protos.errors import Unavailable
from protos.shared.layer_range import LayerRange

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 8.0


def split_group(address: str) -> list[str]:
    """ "a:1+b:2" -> ["a:1", "b:2"]: the replicas of one position."""
    return [a.strip() for a in address.split("+") if a.strip()]


@dataclass
class Replica:
    client: StageClient
    down_since: float | None = None
    next_probe: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    sessions: set[str] = field(default_factory=set)

    @property
    def up(self) -> bool:
        return self.down_since is None


@dataclass
class Position:
    index: int
    group: str  # the plan's address for this position, replicas joined by '+'
    layers: LayerRange
    replicas: list[Replica]

    @property
    def name(self) -> str:
        return f"stage {self.index} ({self.group})"


class ReplicaPool:
    """Positions of the plan in force, session pinning, and the down-stage prober."""

    def __init__(
        self,
        make_client: Callable[[str], StageClient],
        rejoin: Callable[[Replica], None] | None = None,
    ):
        """`rejoin(replica)`: run when a down replica answers again, before it counts as up
        (the router gives it its layers; raising keeps it down)."""
        self.marked_down = 0  # replicas found down so far (each one a failover)
        self.make_client = make_client
        self.positions: list[Position] = []
        self._replicas: dict[str, Replica] = {}  # by stage address, kept across plans
        self._pins: dict[str, list[Replica]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._prober: threading.Thread | None = None
        self.rejoin = rejoin

    def replica(self, address: str) -> Replica:
        with self._lock:
            if address not in self._replicas:
                self._replicas[address] = Replica(self.make_client(address))
            return self._replicas[address]

    def set_positions(self, positions: list[Position]) -> None:
        with self._lock:
            self.positions = positions
            self._pins.clear()
            for r in self._replicas.values():
                r.sessions.clear()

    def position_of(self, replica: Replica) -> Position | None:
        return next((p for p in self.positions if replica in p.replicas), None)

    # ------------------------------------------------------------------ routing

    def route(self, session_id: str) -> list[Replica]:
        """One live replica per position for this session, pinned for its next steps."""
        with self._lock:
            pinned = self._pins.get(session_id, [])
            route = []
            for i, position in enumerate(self.positions):
                choice = pinned[i] if i < len(pinned) else None
                if choice is None or not choice.up:
                    live = [r for r in position.replicas if r.up]
                    if not live:
                        raise Unavailable(
                            f"{position.name} is unreachable: no live replica "
                            f"(down: {', '.join(r.client.address for r in position.replicas)})"
                        )
                    if choice is not None:
                        choice.sessions.discard(session_id)
                    choice = min(live, key=lambda r: len(r.sessions))
                    choice.sessions.add(session_id)
                route.append(choice)
            self._pins[session_id] = route
            return route

    def unpin(self, session_id: str) -> list[Replica]:
        with self._lock:
            route = self._pins.pop(session_id, [])
            for r in route:
                r.sessions.discard(session_id)
            return route

    # ------------------------------------------------------------------ failures

    def mark_down(self, replica: Replica, why: str) -> None:
        with self._lock:
            if replica.down_since is None:
                self.marked_down += 1  # the failovers that /metrics counts
                log.warning("%s is down: %s", replica.client.name, why)
                replica.down_since = time.monotonic()
                replica.backoff_s = FIRST_BACKOFF_S
                replica.next_probe = time.monotonic() + replica.backoff_s
            if self._prober is None:
                self._prober = threading.Thread(target=self._probe_loop, daemon=True)
                self._prober.start()
        self._wake.set()

    def down(self) -> list[Replica]:
        with self._lock:
            return [r for r in self._replicas.values() if not r.up]

    def _probe_loop(self) -> None:
        while not self._closed:
            down = self.down()
            with self._lock:
                # Decided under the lock that mark_down takes: a replica marked down after this
                # sees no prober and starts one; one marked down before it is in `down`.
                if not any(not r.up for r in self._replicas.values()):
                    self._prober = None
                    return
            if not down:
                continue
            wait = min(r.next_probe for r in down) - time.monotonic()
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
                continue
            for replica in down:
                if replica.next_probe <= time.monotonic():
                    self._probe(replica)

    def _probe(self, replica: Replica) -> None:
        try:
            replica.client.info(timeout_s=1.0)
            if self.rejoin is not None:
                self.rejoin(replica)
        except Exception as err:  # noqa: BLE001 - any failure to rejoin: still down, retried
            with self._lock:
                replica.backoff_s = min(replica.backoff_s * 2, MAX_BACKOFF_S)
                replica.next_probe = time.monotonic() + replica.backoff_s
            log.debug("%s still down: %s", replica.client.name, err)
            return
        with self._lock:
            replica.down_since = None
        log.info("%s is back", replica.client.name)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        for r in self._replicas.values():
            r.client.close()
