"""Session-keyed KV caches of one stage, bounded by a byte budget and an idle TTL.

A full cache refuses (ResourceExhausted) rather than evicting a live session; only sessions idle
longer than the TTL are reclaimed. Each session holds one (K, V) buffer pair per held layer,
[n_kv_heads, capacity, head_dim], grown by doubling (bounded by the model's context).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from protos.errors import InvalidArgument, NotFound, ResourceExhausted

GROW_ALIGN = 16  # capacity granularity in tokens


@dataclass(frozen=True)
class CacheShape:
    num_layers: int  # layers held by this stage
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_positions: int  # the model's context length

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize


@dataclass
class Session:
    id: str
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    capacity: int
    length: int = 0
    last_used: float = 0.0
    seen_tokens: list[int] = field(default_factory=list)  # last stage: repetition penalty
    generator: torch.Generator | None = None  # last stage: per-request seed


class SessionCache:
    def __init__(
        self,
        shape: CacheShape,
        budget_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.shape = shape
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.capacity for s in self._sessions.values()) * self.shape.bytes_per_token

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def begin_step(self, session_id: str, start_pos: int, num_tokens: int) -> Session:
        """The session ready to take `num_tokens` at `start_pos`: created at position 0, cut back
        when start_pos is behind its length (a replay), grown to fit."""
        end = start_pos + num_tokens
        if end > self.shape.max_positions:
            raise InvalidArgument(
                f"positions up to {end} exceed the model's context of {self.shape.max_positions}"
            )
        with self._lock:
            self._sweep_locked()
            session = self._sessions.get(session_id)
            if session is None:
                if start_pos != 0:
                    raise NotFound(
                        f"session {session_id!r} is not cached on this stage (start_pos "
                        f"{start_pos}); start it with start_pos 0"
                    )
                session = Session(session_id, kv=[], capacity=0)
            elif start_pos > session.length:
                raise InvalidArgument(
                    f"start_pos {start_pos} is past session {session_id!r}'s cached length "
                    f"{session.length}"
                )
            if start_pos == 0:
                session.seen_tokens.clear()
            self._reserve_locked(session, end)
            session.length = start_pos  # cut back: positions >= start_pos are rewritten
            session.last_used = self.clock()
            self._sessions[session_id] = session
            return session

    def end(self, session_id: str) -> int:
        """Frees a session; returns the bytes released."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound(f"session {session_id!r} is not cached on this stage")
        return session.capacity * self.shape.bytes_per_token

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()

    def sweep(self) -> list[str]:
        with self._lock:
            return self._sweep_locked()

    def _sweep_locked(self) -> list[str]:
        now = self.clock()
        idle = [sid for sid, s in self._sessions.items() if now - s.last_used > self.ttl_s]
        for sid in idle:
            del self._sessions[sid]
        return idle

    def _reserve_locked(self, session: Session, needed: int) -> None:
        if needed <= session.capacity:
            return
        shape = self.shape
        used = sum(s.capacity for s in self._sessions.values() if s is not session)
        free_tokens = self.budget_bytes // shape.bytes_per_token - used
        aligned = -(-needed // GROW_ALIGN) * GROW_ALIGN
        capacity = min(max(aligned, 2 * session.capacity), shape.max_positions, free_tokens)
        if capacity < needed:
            missing = (needed - max(free_tokens, 0)) * shape.bytes_per_token
            raise ResourceExhausted(
                f"KV cache full: session {session.id!r} needs {needed} tokens "
                f"({needed * shape.bytes_per_token} bytes), {missing} bytes over the budget of "
                f"{self.budget_bytes} bytes with {len(self._sessions)} sessions cached; "
                "raise --kv-cache-mb or end sessions"
            )
        new_kv = []
        for i in range(shape.num_layers):
            pair = tuple(
                torch.empty(
                    shape.kv_heads, capacity, shape.head_dim, dtype=shape.dtype, device=shape.device
                )
                for _ in range(2)
            )
            if session.kv:
                for new, old in zip(pair, session.kv[i], strict=True):
                    new[:, : session.length] = old[:, : session.length]
            new_kv.append(pair)
        session.kv = new_kv
        session.capacity = capacity
