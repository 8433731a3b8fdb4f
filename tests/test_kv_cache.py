import pytest
import torch

from protos.errors import InvalidArgument, NotFound, ResourceExhausted
from stage_service.kv_cache import CacheShape, SessionCache

SHAPE = CacheShape(
    num_layers=2,
    kv_heads=2,
    head_dim=4,
    dtype=torch.float32,
    device=torch.device("cpu"),
    max_positions=256,
)
PER_TOKEN = SHAPE.bytes_per_token  # 2 layers * K,V * 2 heads * 4 dims * 4 bytes = 128


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_bytes_per_token():
    assert PER_TOKEN == 2 * 2 * 2 * 4 * 4


def test_sessions_grow_and_are_freed():
    cache = SessionCache(SHAPE, budget_bytes=64 * PER_TOKEN, ttl_s=60)
    s = cache.begin_step("a", 0, 10)
    assert s.capacity == 16 and len(s.kv) == 2 and s.kv[0][0].shape == (2, 16, 4)
    s.kv[0][0][:, :10] = 1.0
    s.length = 10
    s = cache.begin_step("a", 10, 10)  # grows to 32 keeping the first 10 positions
    assert s.capacity == 32 and torch.all(s.kv[0][0][:, :10] == 1.0)
    assert cache.used_bytes == 32 * PER_TOKEN
    assert cache.end("a") == 32 * PER_TOKEN
    assert cache.used_bytes == 0 and "a" not in cache


def test_full_cache_refuses_a_new_session_and_keeps_live_ones():
    cache = SessionCache(SHAPE, budget_bytes=40 * PER_TOKEN, ttl_s=60)
    cache.begin_step("a", 0, 32).length = 32
    with pytest.raises(ResourceExhausted, match="over the budget"):
        cache.begin_step("b", 0, 16)
    assert "a" in cache and "b" not in cache
    cache.begin_step("b", 0, 8)  # what still fits is served


def test_growth_is_capped_by_the_budget_not_refused_while_it_fits():
    cache = SessionCache(SHAPE, budget_bytes=40 * PER_TOKEN, ttl_s=60)
    s = cache.begin_step("a", 0, 32)
    s.length = 32
    s = cache.begin_step("a", 32, 8)  # doubling would want 64, 40 fit
    assert s.capacity == 40
    s.length = 40
    with pytest.raises(ResourceExhausted):
        cache.begin_step("a", 40, 1)


def test_idle_sessions_expire_after_the_ttl_and_free_room():
    clock = Clock()
    cache = SessionCache(SHAPE, budget_bytes=32 * PER_TOKEN, ttl_s=10, clock=clock)
    cache.begin_step("old", 0, 32).length = 32
    clock.now = 5
    with pytest.raises(ResourceExhausted):
        cache.begin_step("new", 0, 16)
    clock.now = 11
    cache.begin_step("new", 0, 16)
    assert "old" not in cache and "new" in cache


def test_position_checks():
    cache = SessionCache(SHAPE, budget_bytes=2**20, ttl_s=60)
    with pytest.raises(NotFound, match="start it with start_pos 0"):
        cache.begin_step("x", 5, 1)
    cache.begin_step("x", 0, 4).length = 4
    with pytest.raises(InvalidArgument, match="past session"):
        cache.begin_step("x", 6, 1)
    with pytest.raises(InvalidArgument, match="context of 256"):
        cache.begin_step("x", 4, 253)
    assert cache.begin_step("x", 2, 1).length == 2  # replay cuts back
    with pytest.raises(NotFound):
        cache.end("nope")


def test_static_slots_are_taken_whole_and_given_back():
    clock = Clock()
    slot_bytes = SHAPE.max_positions * PER_TOKEN
    cache = SessionCache(SHAPE, budget_bytes=2 * slot_bytes + 5, ttl_s=10, clock=clock, static=True)
    assert cache.pool.slots == 2
    a = cache.begin_step("a", 0, 3)
    b = cache.begin_step("b", 0, 200)
    assert (a.slot, b.slot) == (0, 1) and a.capacity == SHAPE.max_positions
    a.kv[1][0][:, 2] = 7.0  # a session's buffers are views of its slot in the pool
    assert torch.all(cache.pool.k[1][0, :, 2] == 7.0)
    with pytest.raises(ResourceExhausted, match="all 2 slots"):
        cache.begin_step("c", 0, 1)
    assert cache.end("a") == slot_bytes
    assert cache.begin_step("c", 0, 1).slot == 0
    with pytest.raises(InvalidArgument, match="context of 256 tokens"):
        cache.begin_step("b", 200, 57)
    clock.now = 11  # both idle past the TTL: their slots come back
    assert cache.begin_step("d", 0, 1).slot == 0
    assert cache.begin_step("e", 0, 1).slot == 1


def test_static_slots_need_room_for_one():
    with pytest.raises(ResourceExhausted, match="does not hold one slot"):
        SessionCache(SHAPE, budget_bytes=100 * PER_TOKEN, ttl_s=10, static=True)
