import pytest

from orchestrator.plan import PartitionPlan
from orchestrator.strategies import uniform
from protos.errors import InvalidArgument
from protos.shared.layer_range import LayerRange


@pytest.mark.parametrize("layers, stages", [(30, 2), (30, 4), (5, 3), (7, 7), (1, 1), (31, 8)])
def test_uniform_covers_every_layer_once_and_spreads_the_remainder_first(layers, stages):
    plan = uniform(layers, [f"h:{i}" for i in range(stages)])
    sizes = [len(r) for r in plan.ranges]
    assert sum(sizes) == layers and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    assert [r.start for r in plan.ranges] == [0] + [r.end for r in plan.ranges[:-1]]


def test_uniform_refuses_more_stages_than_layers():
    with pytest.raises(InvalidArgument, match="cannot split 2 layers over 3 stages"):
        uniform(2, ["a:1", "b:2", "c:3"])


@pytest.mark.parametrize(
    "ranges, needle",
    [
        ([LayerRange(0, 4), LayerRange(5, 10)], "starts at layer 5, expected 4"),
        ([LayerRange(0, 4), LayerRange(3, 10)], "starts at layer 3, expected 4"),
        ([LayerRange(0, 4), LayerRange(4, 9)], "model has 10"),
        ([LayerRange(0, 10), LayerRange(10, 10)], "no layers"),
    ],
)
def test_invalid_plans_are_refused(ranges, needle):
    with pytest.raises(InvalidArgument, match=needle):
        PartitionPlan(10, ("a:1", "b:2"), tuple(ranges), "custom")
