"""Partition strategies against independent oracles: brute force over every contiguous split on
small cases, a reachability check of feasibility on large ones (worked examples:
tests/test_strategy_examples.py)."""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.plan import PartitionPlan
from orchestrator.plan_spec import PlanSpec, Strategy
from orchestrator.profile import ModelProfile, StageCapacity
from orchestrator.strategies import estimate_ms_per_token, make_plan, uniform
from protos.errors import InvalidArgument
from protos.shared.layer_range import LayerRange

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AUTOMATIC = [Strategy.UNIFORM, Strategy.MEMORY, Strategy.COMPUTE, Strategy.MIXED]


# ---------------------------------------------------------------- oracles (from the fields)


def weight_bytes(p: ModelProfile, r: LayerRange, first: bool, last: bool) -> int:
    total = sum(p.layer_bytes[r.start : r.end])
    if first:
        total += p.embed_bytes
    if last:
        total += p.norm_bytes + (0 if p.tied and first else p.head_bytes)
    return total


def need(p, caps, i, n, r) -> int:
    return weight_bytes(p, r, i == 0, i == n - 1) + caps[i].kv_budget_bytes


def limits_of(caps, spec: PlanSpec) -> list[int]:
    n = spec.num_partitions or len(caps)
    if not spec.max_memory_bytes:
        return [c.memory_bytes for c in caps[:n]]
    if len(spec.max_memory_bytes) == 1:
        return list(spec.max_memory_bytes) * n
    return list(spec.max_memory_bytes)


def fits(p, caps, limits, ranges) -> bool:
    n = len(ranges)
    return all(need(p, caps, i, n, r) <= limits[i] for i, r in enumerate(ranges))


def times(p, caps, ranges) -> list[float]:
    n = len(ranges)
    return [estimate_ms_per_token(p, caps[i], r, i == 0, i == n - 1) for i, r in enumerate(ranges)]


def fills(p, caps, limits, ranges) -> list[float]:
    n = len(ranges)
    out = []
    for i, r in enumerate(ranges):
        room = (
            limits[i]
            - caps[i].kv_budget_bytes
            - weight_bytes(p, LayerRange(0, 0), i == 0, i == n - 1)
        )
        layers = sum(p.layer_bytes[r.start : r.end])
        out.append(layers / room if room > 0 else 0.0)
    return out


def splits(num_layers: int, n: int):
    for cuts in combinations(range(1, num_layers), n - 1):
        bounds = (0, *cuts, num_layers)
        yield tuple(LayerRange(a, b) for a, b in zip(bounds, bounds[1:], strict=False))


def starts(ranges) -> tuple[int, ...]:
    return tuple(r.start for r in ranges)


def leximax(values) -> tuple:
    return tuple(sorted(values, reverse=True))


def reachable(p, caps, limits, n) -> bool:
    """Feasibility by plain reachability: which prefixes can stages 0..j-1 cover?"""
    ends = {0}
    for i in range(n):
        ends = {
            e
            for s in ends
            for e in range(s + 1, p.num_layers + 1)
            if need(p, caps, i, n, LayerRange(s, e)) <= limits[i]
        }
    return p.num_layers in ends


def assert_valid(plan: PartitionPlan, p, caps, spec) -> None:
    n = spec.num_partitions or len(caps)
    assert plan.addresses == tuple(c.address for c in caps[:n])
    covered = [i for r in plan.ranges for i in range(r.start, r.end)]
    assert covered == list(range(p.num_layers))  # every layer once, in order: contiguous
    assert all(len(r) >= 1 for r in plan.ranges)
    assert fits(p, caps, limits_of(caps, spec), plan.ranges)
    assert plan.strategy == spec.strategy.value


# ---------------------------------------------------------------- generators


@st.composite
def problems(draw, max_layers=40, max_stages=6):
    num_layers = draw(st.integers(1, max_layers))
    # Few distinct values make ties common, which exercises the tie-breaks.
    small = draw(st.booleans())
    layer_bytes = draw(
        st.lists(
            st.sampled_from([100, 200]) if small else st.integers(1, 1000),
            min_size=num_layers,
            max_size=num_layers,
        )
    )
    flops = draw(
        st.lists(
            st.sampled_from([1000.0, 2000.0]) if small else st.integers(1, 10**6).map(float),
            min_size=num_layers,
            max_size=num_layers,
        )
    )
    tied = draw(st.booleans())
    embed = draw(st.integers(0, 2000))
    profile = ModelProfile(
        num_layers=num_layers,
        layer_bytes=tuple(layer_bytes),
        embed_bytes=embed,
        norm_bytes=draw(st.integers(0, 50)),
        head_bytes=embed if tied else draw(st.integers(0, 2000)),
        tied=tied,
        layer_flops_decode=tuple(flops),
        layer_flops_prefill=tuple(flops),
        head_flops=float(draw(st.integers(0, 10**6))),
        kv_bytes_per_token_per_layer=8,
    )
    n = draw(st.integers(1, max_stages))
    num_partitions = draw(st.one_of(st.none(), st.integers(1, n)))
    used = num_partitions or n
    # Limits around a fair share of the model: tight (most often infeasible), near the share
    # (feasible, often not for the compute optimum) or loose.
    share = (sum(layer_bytes) + embed + profile.head_bytes) // used + 300
    low, high = draw(st.sampled_from([(0, 6), (5, 8), (4, 25)]))
    limit = st.integers(share * low // 5, share * high // 5)
    caps = [
        StageCapacity(
            address=f"h:{i}",
            device="cpu",
            memory_bytes=draw(limit),
            kv_budget_bytes=draw(st.integers(0, 300)),
            gflops=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
        )
        for i in range(n)
    ]
    max_memory = draw(
        st.one_of(
            st.just(()),
            st.tuples(limit),
            st.lists(limit, min_size=used, max_size=used).map(tuple),
        )
    )
    if used <= num_layers and draw(st.booleans()):
        # Limits that a random split meets with a little slack: feasible by construction, at
        # the edge, and seldom by the compute optimum.
        inner = st.integers(1, max(1, num_layers - 1))
        cuts = sorted(draw(st.sets(inner, min_size=used - 1, max_size=used - 1)))
        bounds = (0, *cuts, num_layers)
        ranges = [LayerRange(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        max_memory = tuple(
            need(profile, caps, i, used, r) + draw(st.integers(0, 50)) for i, r in enumerate(ranges)
        )
    return profile, caps, num_partitions, max_memory


# ---------------------------------------------------------------- properties


@SETTINGS
@given(problems())
def test_every_plan_covers_each_layer_once_within_the_limits(problem):
    p, caps, num_partitions, max_memory = problem
    n = num_partitions or len(caps)
    for strategy in AUTOMATIC:
        spec = PlanSpec(strategy, num_partitions, max_memory)
        limits = limits_of(caps, spec)
        if n > p.num_layers:
            with pytest.raises(InvalidArgument, match=f"cannot split {p.num_layers} layers"):
                make_plan(p, caps, spec)
            continue
        try:
            plan = make_plan(p, caps, spec, epoch=7)
        except InvalidArgument as err:
            event(f"{strategy.value}: refused")
            message = str(err)
            assert "bytes more than its limit of" in message
            assert any(f"stage {i} (h:{i}, layers" in message for i in range(n))
            if strategy is Strategy.UNIFORM:
                assert not fits(p, caps, limits, uniform(p.num_layers, ["x"] * n).ranges)
            if strategy in (Strategy.MEMORY, Strategy.MIXED):
                assert not reachable(p, caps, limits, n), "a split fits but none was found"
                assert "no split of" in message
            continue
        event(f"{strategy.value}: planned")
        assert plan.epoch == 7
        assert_valid(plan, p, caps, spec)
        if strategy is Strategy.UNIFORM:
            assert plan.ranges == uniform(p.num_layers, ["x"] * n).ranges


@SETTINGS
@given(problems(max_layers=10, max_stages=4))
def test_compute_mixed_and_memory_equal_brute_force(problem):
    p, caps, num_partitions, max_memory = problem
    n = num_partitions or len(caps)
    if n > p.num_layers:
        return
    spec = PlanSpec(Strategy.COMPUTE, num_partitions, max_memory)
    limits = limits_of(caps, spec)
    every = list(splits(p.num_layers, n))
    feasible = [s for s in every if fits(p, caps, limits, s)]

    # compute: least slowest stage over all splits; then most even, then earliest.
    best = min(every, key=lambda s: (leximax(times(p, caps, s)), starts(s)))
    if fits(p, caps, limits, best):
        plan = make_plan(p, caps, spec)
        assert max(times(p, caps, plan.ranges)) == min(max(times(p, caps, s)) for s in every)
        assert plan.ranges == best
    else:
        with pytest.raises(InvalidArgument, match="does not fit"):
            make_plan(p, caps, spec)

    # mixed: the same order over the splits that fit.
    mixed = PlanSpec(Strategy.MIXED, num_partitions, max_memory)
    memory = PlanSpec(Strategy.MEMORY, num_partitions, max_memory)
    event(f"feasible: {bool(feasible)}, compute fits: {fits(p, caps, limits, best)}")
    if feasible:
        plan = make_plan(p, caps, mixed)
        assert max(times(p, caps, plan.ranges)) == min(max(times(p, caps, s)) for s in feasible)
        assert plan.ranges == min(feasible, key=lambda s: (leximax(times(p, caps, s)), starts(s)))
        plan = make_plan(p, caps, memory)
        assert_valid(plan, p, caps, memory)
        assert plan.ranges == min(
            feasible,
            key=lambda s: (
                leximax(fills(p, caps, limits, s)),
                leximax(times(p, caps, s)),
                starts(s),
            ),
        )
    else:
        # The message names the closest split's shortest stage and its total shortfall.
        def short(s):
            return [max(0, need(p, caps, i, n, r) - limits[i]) for i, r in enumerate(s)]

        closest = min(every, key=lambda s: (sum(short(s)), starts(s)))
        deficits = short(closest)
        worst = deficits.index(max(deficits))
        for spec_ in (mixed, memory):
            with pytest.raises(InvalidArgument) as err:
                make_plan(p, caps, spec_)
            message = str(err.value)
            assert f"{sum(deficits):,} bytes short in all" in message
            assert f"stage {worst} (h:{worst}, layers {closest[worst]}) needs " in message
            assert f"needs {deficits[worst]:,} bytes more than its limit of {limits[worst]:,}" in (
                message
            )
