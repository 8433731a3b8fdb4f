"""Partition strategies against independent oracles: brute force over every contiguous split on
small cases, a reachability check of feasibility on large ones, and worked examples."""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.plan import PartitionPlan
from orchestrator.plan_spec import STRATEGIES, PlanSpec, Strategy, parse_boundaries, parse_memory
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


# ---------------------------------------------------------------- worked examples


def flat_profile(num_layers, layer_bytes=100, flops=1000.0, head_flops=0.0, embed=0, tied=False):
    return ModelProfile(
        num_layers=num_layers,
        layer_bytes=(layer_bytes,) * num_layers,
        embed_bytes=embed,
        norm_bytes=0,
        head_bytes=embed if tied else 0,
        tied=tied,
        layer_flops_decode=(flops,) * num_layers,
        layer_flops_prefill=(flops,) * num_layers,
        head_flops=head_flops,
        kv_bytes_per_token_per_layer=8,
    )


def caps_of(*specs):
    """(memory, kv, gflops) per stage."""
    return [StageCapacity(f"h:{i}", "cpu", m, kv, g) for i, (m, kv, g) in enumerate(specs)]


def test_compute_gives_the_faster_stage_more_layers():
    plan = make_plan(
        flat_profile(4), caps_of((10**9, 0, 1.0), (10**9, 0, 3.0)), PlanSpec("compute")
    )
    assert [len(r) for r in plan.ranges] == [1, 3]


def test_compute_puts_the_head_cost_on_the_last_stage():
    # 10 equal layers, equal stages; the head costs 4 layers: 7 | 3 + head.
    profile = flat_profile(10, head_flops=4000.0)
    plan = make_plan(profile, caps_of((10**9, 0, 1.0), (10**9, 0, 1.0)), PlanSpec("compute"))
    assert [len(r) for r in plan.ranges] == [7, 3]


def test_memory_spreads_layers_in_proportion_to_the_memory_left():
    # The last stage keeps 400 bytes for its KV budget: 1000 and 3000 left for layers.
    plan = make_plan(
        flat_profile(8), caps_of((1000, 0, 1.0), (3400, 400, 1.0)), PlanSpec(Strategy.MEMORY)
    )
    assert [len(r) for r in plan.ranges] == [2, 6]


def test_ties_prefer_even_stage_times_then_the_earliest_boundaries():
    caps = caps_of((10**9, 0, 1.0), (10**9, 0, 1.0))
    # 31 equal layers on equal memory: 16|15 and 15|16 fill alike; the head makes the last
    # stage slower, so it gets the 15.
    plan = make_plan(flat_profile(31, head_flops=10.0), caps, PlanSpec(Strategy.MEMORY))
    assert [len(r) for r in plan.ranges] == [16, 15]
    # No head cost: a full tie, the earliest boundary wins.
    plan = make_plan(flat_profile(31), caps, PlanSpec(Strategy.MEMORY))
    assert [len(r) for r in plan.ranges] == [15, 16]
    # Compute: the slowest stage is stage 0 with its one layer whatever the rest do; the other
    # stages are still evened out (2|3 or 3|2, not 1|4), and of those the earliest boundary wins.
    profile = flat_profile(6)
    caps3 = caps_of((10**9, 0, 1.0), (10**9, 0, 10.0), (10**9, 0, 10.0))
    plan = make_plan(profile, caps3, PlanSpec(Strategy.COMPUTE))
    assert [len(r) for r in plan.ranges] == [1, 2, 3]


def test_uniform_over_a_limit_names_the_stage_and_the_missing_bytes():
    profile = flat_profile(4, layer_bytes=1_502_561_728)  # two layers: 3,005,123,456 bytes
    caps = caps_of((10**10, 0, 1.0), (4_000_000_000, 1_000_000_000, 1.0))
    with pytest.raises(InvalidArgument) as err:
        make_plan(profile, caps, PlanSpec(Strategy.UNIFORM))
    assert (
        "stage 1 (h:1, layers 2-3) needs 5,123,456 bytes more than its limit of 4,000,000,000 "
        "(weights 3.0 GB + KV budget 1.0 GB)"
    ) in str(err.value)
    # The memory strategy moves a layer to stage 0 and fits.
    plan = make_plan(profile, caps, PlanSpec(Strategy.MEMORY))
    assert [len(r) for r in plan.ranges] == [3, 1]


def test_tied_head_is_counted_on_the_last_stage_unless_it_is_also_the_first():
    profile = flat_profile(2, layer_bytes=10, embed=100, tied=True)
    # One stage: 20 + 100 (the head is the embedding itself).
    make_plan(profile, caps_of((120, 0, 1.0)), PlanSpec())
    with pytest.raises(InvalidArgument, match=r"stage 0 \(h:0, layers 0-1\) needs 1 bytes more"):
        make_plan(profile, caps_of((119, 0, 1.0)), PlanSpec())
    # Two stages: the last holds its own copy of the head.
    with pytest.raises(InvalidArgument, match=r"stage 1 \(h:1, layers 1-1\) needs 1 bytes more"):
        make_plan(profile, caps_of((110, 0, 1.0), (109, 0, 1.0)), PlanSpec())


def test_no_split_fits_names_the_shortest_stage_and_total():
    profile = flat_profile(4)
    caps = caps_of((150, 0, 1.0), (150, 0, 1.0))
    with pytest.raises(InvalidArgument) as err:
        make_plan(profile, caps, PlanSpec(Strategy.MIXED))
    message = str(err.value)
    assert "no split of 4 layers over 2 stages fits" in message
    assert "100 bytes short in all" in message
    assert "stage 0 (h:0, layers 0-1) needs 50 bytes more than its limit of 150" in message


def test_num_partitions_and_limits():
    profile = flat_profile(6)
    caps = caps_of(*[(10**6, 0, 1.0)] * 4)
    plan = make_plan(profile, caps, PlanSpec(num_partitions=2))
    assert plan.addresses == ("h:0", "h:1") and len(plan.ranges) == 2
    for bad in (0, 5):
        with pytest.raises(InvalidArgument, match="num_partitions must be between 1 and the 4"):
            make_plan(profile, caps, PlanSpec(num_partitions=bad))
    with pytest.raises(InvalidArgument, match="cannot split 6 layers over 7 stages"):
        make_plan(profile, caps_of(*[(10**6, 0, 1.0)] * 7), PlanSpec())
    with pytest.raises(InvalidArgument, match="3 memory limits for 4 stages"):
        make_plan(profile, caps, PlanSpec(max_memory_bytes=(1, 2, 3)))
    # One value applies to every stage and overrides their own memory.
    with pytest.raises(InvalidArgument, match="stage 0 .* limit of 299"):
        make_plan(profile, caps, PlanSpec(num_partitions=2, max_memory_bytes=(299,)))
    make_plan(profile, caps, PlanSpec(num_partitions=2, max_memory_bytes=(300,)))
    with pytest.raises(InvalidArgument, match="stage 1 .* limit of 200"):
        make_plan(profile, caps, PlanSpec(num_partitions=2, max_memory_bytes=(400, 200)))
    with pytest.raises(InvalidArgument, match="no stages"):
        make_plan(profile, [], PlanSpec())


def test_custom_plans_are_taken_as_given_and_checked():
    profile = flat_profile(10)
    caps = caps_of((10**6, 0, 1.0), (10**6, 0, 1.0))
    spec = PlanSpec(Strategy.CUSTOM, custom_boundaries=parse_boundaries("0-2,3-9"))
    plan = make_plan(profile, caps, spec)
    assert plan.ranges == (LayerRange(0, 3), LayerRange(3, 10)) and plan.strategy == "custom"
    cases = {
        "0-2,4-9": "range 1 (4-9) starts at layer 4 but the layers before it end at 2: "
        "layer(s) 3-3 are served by no stage",
        "0-4,3-9": "range 1 (3-9) starts at layer 3 but the layers before it end at 4: "
        "layer(s) 3-4 would be served twice",
        "1-4,5-9": "range 0 (1-4) starts at layer 1 but the first range must start at layer 0: "
        "layer(s) 0-0 are served by no stage",
        "0-4,5-8": "end at layer 8 but the model has 10 layers (0-9): layer(s) 9-9 are served",
        "0-4,5-11": "end at layer 11 but the model has 10 layers (0-9): layer(s) 10-11 do not",
        "0-9": "1 custom layer range(s) for 2 stage(s): give exactly one per stage",
        "": "the custom strategy needs one layer range per stage",
    }
    for text, needle in cases.items():
        ranges = parse_boundaries(text) if text else ()
        with pytest.raises(InvalidArgument) as err:
            make_plan(profile, caps, PlanSpec(Strategy.CUSTOM, custom_boundaries=ranges))
        assert needle in str(err.value)
    with pytest.raises(InvalidArgument, match="custom boundaries only apply"):
        make_plan(
            profile, caps, PlanSpec(Strategy.MEMORY, custom_boundaries=spec.custom_boundaries)
        )
    with pytest.raises(InvalidArgument, match="has no layers"):
        make_plan(
            profile,
            caps,
            PlanSpec("custom", custom_boundaries=(LayerRange(0, 0), LayerRange(0, 10))),
        )
    with pytest.raises(InvalidArgument, match="stage 1 \\(h:1, layers 3-9\\) needs 100 bytes more"):
        make_plan(profile, caps_of((10**6, 0, 1.0), (600, 0, 1.0)), spec)


def test_parse_boundaries():
    assert parse_boundaries("0-9,10-29") == (LayerRange(0, 10), LayerRange(10, 30))
    assert parse_boundaries(" 0 - 4 , 5 ,6-6") == (
        LayerRange(0, 5),
        LayerRange(5, 6),
        LayerRange(6, 7),
    )
    for bad in ["", "0-", "a-b", "0-9;10-29", "-1-3", "0-9,,10-12"]:
        with pytest.raises(InvalidArgument, match="e.g. 0-9,10-29"):
            parse_boundaries(bad)
    with pytest.raises(InvalidArgument, match="ends before it starts"):
        parse_boundaries("0-4,9-5")


def test_parse_memory():
    assert parse_memory("4GB") == (4 * 10**9,)
    assert parse_memory("512MiB") == (512 * 2**20,)
    assert parse_memory("4GB,8GB") == (4 * 10**9, 8 * 10**9)
    assert parse_memory("1073741824") == (2**30,)
    assert parse_memory(" 2 gib , 1.5GB,3KB,2KiB,7B,1TB") == (
        2 * 2**30,
        1_500_000_000,
        3000,
        2048,
        7,
        10**12,
    )
    for bad in ["", "4G", "abc", "-1GB", "1.5", "4GB,,8GB", "GB", "4 GB 2"]:
        with pytest.raises(InvalidArgument) as err:
            parse_memory(bad)
        assert "GiB" in str(err.value) and "4GB,8GB" in str(err.value)
    with pytest.raises(InvalidArgument, match="more than 0"):
        parse_memory("0")


def test_strategy_names_and_spec_coercion():
    assert STRATEGIES == ("uniform", "memory", "compute", "mixed", "custom")
    assert PlanSpec("mixed").strategy is Strategy.MIXED
    assert PlanSpec(max_memory_bytes=[1, 2]).max_memory_bytes == (1, 2)
    with pytest.raises(InvalidArgument, match="choose one of uniform, memory"):
        PlanSpec("fastest")


def test_estimate_ms_per_token():
    profile = flat_profile(4, flops=1e9, head_flops=2e9)
    cap = StageCapacity("h:0", "cpu", 0, 0, 2.0)
    assert estimate_ms_per_token(profile, cap, LayerRange(0, 2), True, False) == 1000.0
    assert estimate_ms_per_token(profile, cap, LayerRange(2, 4), False, True) == 2000.0
