"""Session-keyed KV caches of one stage, bounded by a byte budget and an idle TTL.

A full cache refuses (ResourceExhausted) rather than evicting a live session; only sessions idle
longer than the TTL are reclaimed. Each session holds one (K, V) buffer pair per held layer,
[n_kv_heads, capacity, head_dim]. Where they live is one of two layouts:

- growable (the CPU default): each session's own buffers, grown by doubling up to the context;
  memory follows the sessions' lengths.
- static slots (the CUDA default, `SlotPool`): per layer one K and one V tensor
  [slots + 1, n_kv_heads, context, head_dim] allocated once; a session owns one slot and its
  buffers are views of it. Addresses never change, so a decode step can be captured once as a
  CUDA graph and replayed (stage_service/decode.py); the budget buys whole slots.
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
    slot: int = -1  # static layout: the session's slot in the pool


def check_slot_budget(shape: CacheShape, budget_bytes: int) -> int:
    """The number of static slots a budget holds; ResourceExhausted when not even one."""
    per_slot = shape.max_positions * shape.bytes_per_token
    if budget_bytes < per_slot:
        raise ResourceExhausted(
            f"the KV budget of {budget_bytes // 2**20} MiB does not hold one slot of "
            f"{shape.max_positions} tokens ({per_slot} bytes for {shape.num_layers} layers): "
            "raise --kv-cache-mb or lower --max-context"
        )
    return budget_bytes // per_slot


class SlotPool:
    """Static KV storage: per held layer one K and one V tensor [slots + 1, kv_heads, context,
    head_dim]. The extra last slot is scratch, written by the padding rows of a graph bucket."""

    def __init__(self, shape: CacheShape, slots: int):
        """slots: as many as the budget holds (check_slot_budget), at least one."""
        dims = (slots + 1, shape.kv_heads, shape.max_positions, shape.head_dim)
        layers = range(shape.num_layers)
        self.k = [torch.zeros(dims, dtype=shape.dtype, device=shape.device) for _ in layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.slots = slots
        self.scratch = slots
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest first

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def give_back(self, slot: int) -> None:
        self._free.append(slot)
        self._free.sort(reverse=True)

    def views(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[slot], v[slot]) for k, v in zip(self.k, self.v, strict=True)]


class SessionCache:
    def __init__(
        self,
        shape: CacheShape,
        budget_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        static: bool = False,
    ):
        """static: the slot layout, as many slots of shape.max_positions tokens as the budget
        holds (see the module docstring)."""
        self.shape = shape
        self.pool: SlotPool | None = None
        if static:
            self.pool = SlotPool(shape, check_slot_budget(shape, budget_bytes))
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._sweep_every_s = min(1.0, ttl_s / 4)  # and whenever the cache is full
        self._next_sweep = 0.0

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
                f"positions up to {end} exceed the context of {self.shape.max_positions} tokens "
                "this stage serves (the model's, or --max-context)"
            )
        with self._lock:
            if self.clock() >= self._next_sweep:
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
            del session.seen_tokens[start_pos:]  # the tokens before the step, as on a first run
            try:
                self._reserve_locked(session, end)
            except ResourceExhausted:
                if not self._sweep_locked(keep=session):
                    raise
                self._reserve_locked(session, end)  # idle sessions made room
            session.length = start_pos  # cut back: positions >= start_pos are rewritten
            session.last_used = self.clock()
            self._sessions[session_id] = session
            return session

    def end(self, session_id: str) -> int:
        """Frees a session; returns the bytes released."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._release_locked(session)
        if session is None:
            raise NotFound(f"session {session_id!r} is not cached on this stage")
        return session.capacity * self.shape.bytes_per_token

    def sweep(self) -> list[str]:
        with self._lock:
            return self._sweep_locked()

    def _sweep_locked(self, keep: Session | None = None) -> list[str]:
        now = self.clock()
        self._next_sweep = now + self._sweep_every_s
        idle = [
            sid
            for sid, s in self._sessions.items()
            if now - s.last_used > self.ttl_s and s is not keep
        ]
        for sid in idle:
            self._release_locked(self._sessions.pop(sid))
        return idle

    def _release_locked(self, session: Session) -> None:
        if self.pool is not None and session.slot >= 0:
            self.pool.give_back(session.slot)
            session.slot = -1

    def _reserve_locked(self, session: Session, needed: int) -> None:
        if needed <= session.capacity:
            return
        if self.pool is not None:  # a new session: its whole slot, or a refusal
            slot = self.pool.take()
            if slot is None:
                raise ResourceExhausted(
                    f"KV cache full: all {self.pool.slots} slots of {self.shape.max_positions} "
                    f"tokens are taken by live sessions, none for session {session.id!r}; end "
                    "sessions, raise --kv-cache-mb or lower --max-context"
                )
            session.slot, session.kv = slot, self.pool.views(slot)
            session.capacity = self.shape.max_positions
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
