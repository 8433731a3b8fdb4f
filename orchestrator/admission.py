"""Admission of prefill work: the orchestrator lets at most a budget of prefill tokens (prompt
chunks and replays) be in flight through the stages at once. More wait their turn here, first
come first served, so a burst of long prompts queues in the orchestrator instead of piling up
on the stages, where every step would then wait behind all of them. Decode steps (one token per
session) never wait: they are what keeps running sessions moving.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from collections.abc import Iterator

from protos.errors import Cancelled

POLL_S = 0.25  # how often a waiter (here, or a step in the router) looks at its cancellation


class TokenBudget:
    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("a token budget must be positive")
        self.capacity = capacity
        self.in_flight = 0
        self._cond = threading.Condition()
        self._line: deque[int] = deque()  # tickets of the waiters, in arrival order
        self._tickets = itertools.count()

    @contextlib.contextmanager
    def hold(self, tokens: int, cancelled: threading.Event | None = None) -> Iterator[None]:
        """Waits until `tokens` (at most the whole budget) fit and every earlier waiter went
        first, holds them for the body. Raises Cancelled if `cancelled` is set meanwhile."""
        tokens = min(tokens, self.capacity)
        with self._cond:
            ticket = next(self._tickets)
            self._line.append(ticket)
            try:
                while self._line[0] != ticket or self.in_flight + tokens > self.capacity:
                    if cancelled is not None and cancelled.is_set():
                        raise Cancelled("the request was cancelled while it waited to prefill")
                    self._cond.wait(POLL_S if cancelled is not None else None)
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()
            self.in_flight += tokens
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= tokens
                self._cond.notify_all()
