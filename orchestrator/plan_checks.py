"""The stage positions a plan request names, before and after planning: each names an address
and none twice (`check_positions`), what one can hold (`position_capacity`, its weakest
replica), and whether each holds the layers the plan gives it (`check_held_layers`)."""

from __future__ import annotations

from orchestrator.plan import PartitionPlan
from orchestrator.profile import StageCapacity
from orchestrator.replicas import split_group
from protos import llamadist_pb2 as pb
from protos.errors import FailedPrecondition, InvalidArgument
from protos.shared.submodel import describe


def check_positions(addresses: list[str]) -> None:
    """Each stage position names at least one address, and no address is named twice."""
    for i, group in enumerate(addresses):
        if not split_group(group):
            raise InvalidArgument(
                f"stage position {i} names no address ({group!r}): give host:port, "
                "or host:port+host:port for replicas"
            )
    every = [a for group in addresses for a in split_group(group)]
    if len(set(every)) != len(every):
        raise InvalidArgument(f"a stage is named twice in {addresses}")


def position_capacity(group: str, infos: list[pb.StageInfo]) -> StageCapacity:
    """A position is as strong as its weakest replica."""
    return StageCapacity(
        address=group,
        device="+".join(sorted({i.device for i in infos})),
        memory_bytes=min(i.memory_free_bytes + i.weight_bytes + i.kv_used_bytes for i in infos),
        kv_budget_bytes=min(i.kv_budget_bytes for i in infos),
        gflops=max(min(i.gflops for i in infos), 1e-3),
    )


def check_held_layers(plan: PartitionPlan, groups: list[list[pb.StageInfo]]) -> None:
    """A plan must give each stage layers its model directory holds (a submodel holds a range
    only), unless it takes what it lacks from the orchestrator (--fetch-weights): else
    FAILED_PRECONDITION naming the stage and the layers it would need."""
    used = groups[: len(plan.ranges)]  # num_partitions may use the first N positions only
    for i, (address, layers, infos) in enumerate(
        zip(plan.addresses, plan.ranges, used, strict=True)
    ):
        for info in infos:
            if info.held_layer_end == 0 or info.fetches_weights:
                continue  # from before submodels (the whole model), or shipped what it lacks
            lacking = [
                n for n in range(layers.start, layers.end)
                if not info.held_layer_start <= n < info.held_layer_end
            ]  # fmt: skip
            if lacking:
                raise FailedPrecondition(
                    f"stage {i} ({address}) holds layers {info.held_layer_start}-"
                    f"{info.held_layer_end - 1} only (a submodel); the plan gives it layers "
                    f"{layers.start}-{layers.end - 1}, so it would need layers "
                    f"{describe(lacking)}: plan with --strategy custom --boundaries matching "
                    "the submodels, or start that stage on a directory holding those layers"
                )
