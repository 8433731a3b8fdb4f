"""Partition strategies on worked examples, each with the plan a reader can check by hand, and
the parsing of plan requests (tests/test_strategies.py holds the oracles and properties)."""

from __future__ import annotations

import pytest

from orchestrator.plan_spec import STRATEGIES, PlanSpec, Strategy, parse_boundaries, parse_memory
from orchestrator.profile import ModelProfile, StageCapacity
from orchestrator.strategies import estimate_ms_per_token, make_plan
from protos.errors import InvalidArgument
from protos.shared.layer_range import LayerRange

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
