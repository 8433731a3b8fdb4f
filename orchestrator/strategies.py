"""Partition strategies: pure functions (model profile, stage capacities, spec) -> PartitionPlan.

- uniform: equal layer counts, the remainder one each on the first stages.
- memory: layers in proportion to the memory each stage has left after its fixed parts
  (KV budget, embeddings on the first, norm + head on the last): the split whose fill fractions
  (layer bytes / memory left) are most even, max first (leximax). It fits whenever any
  contiguous split fits.
- compute: the split whose slowest stage is fastest (time per token = stage FLOPs / speed, the
  head on the last stage, embeddings free), exactly, by dynamic programming over contiguous
  splits.
- mixed: the compute objective over the splits that fit the memory limits only.
- custom: the given ranges, checked.

Every plan is checked against the memory limits (weights + KV budget <= limit, per stage).

Ties are broken deterministically: most even stage times (the sorted times compared largest
first; for memory after the fill fractions), then the earliest boundaries. Both orders are
compatible with appending a stage, so the dynamic programme finds the exact optimum of the whole
order, not only of the primary objective.

No torch and no gRPC here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

from orchestrator.plan import PartitionPlan, check_contiguous
from orchestrator.plan_spec import PlanSpec, Strategy
from orchestrator.profile import ModelProfile, StageCapacity
from protos.errors import InvalidArgument
from protos.shared.layer_range import LayerRange

# ---------------------------------------------------------------- the legacy entry point


def uniform(num_layers: int, addresses: Sequence[str], epoch: int = 1) -> PartitionPlan:
    """Equal layer counts; the remainder goes to the first stages, one each. No memory check
    (make_plan with Strategy.UNIFORM adds one)."""
    n = len(addresses)
    if not 0 < n <= num_layers:
        raise InvalidArgument(f"cannot split {num_layers} layers over {n} stages")
    return PartitionPlan(
        num_layers, tuple(addresses), _uniform_ranges(num_layers, n), Strategy.UNIFORM.value, epoch
    )


def _uniform_ranges(num_layers: int, n: int) -> tuple[LayerRange, ...]:
    base, extra = divmod(num_layers, n)
    ranges, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        ranges.append(LayerRange(start, start + size))
        start += size
    return tuple(ranges)


# ---------------------------------------------------------------- estimates


def estimate_ms_per_token(
    profile: ModelProfile, capacity: StageCapacity, r: LayerRange, first: bool, last: bool
) -> float:
    """Decode time of one token on that stage, in ms, from its measured speed."""
    return profile.stage_flops(r, first, last) / (capacity.gflops * 1e9) * 1e3


# ---------------------------------------------------------------- the planner


def make_plan(
    profile: ModelProfile | Sequence[ModelProfile],
    capacities: list[StageCapacity],
    spec: PlanSpec,
    epoch: int = 1,
) -> PartitionPlan:
    """`profile`: the model at the stages' weight format, or one per stage where their formats
    differ (dtype, --quantize): each stage's bytes are counted at its own format."""
    problem = _Problem.build(profile, capacities, spec)
    strategy = spec.strategy
    if spec.custom_boundaries and strategy is not Strategy.CUSTOM:
        raise InvalidArgument(
            f"custom boundaries only apply to the custom strategy, not to {strategy.value}"
        )
    if strategy is Strategy.UNIFORM:
        ranges = _uniform_ranges(problem.num_layers, problem.n)
    elif strategy is Strategy.CUSTOM:
        ranges = _check_custom(spec.custom_boundaries, problem)
    elif strategy is Strategy.COMPUTE:
        ranges = _best_split(problem, [problem.time])
    elif strategy is Strategy.MEMORY:
        ranges = _best_split(problem, [problem.fill, problem.time], allowed=problem.fits)
    else:  # MIXED
        ranges = _best_split(problem, [problem.time], allowed=problem.fits)
    if ranges is None:
        problem.raise_no_split_fits(strategy)
    problem.check_memory(ranges, strategy)
    return PartitionPlan(
        problem.num_layers,
        tuple(c.address for c in problem.stages),
        ranges,
        strategy.value,
        epoch,
    )


@dataclass(frozen=True)
class _Problem:
    profiles: tuple[ModelProfile, ...]  # per stage, at its weight format
    stages: tuple[StageCapacity, ...]
    limits: tuple[int, ...]

    @classmethod
    def build(
        cls,
        profile: ModelProfile | Sequence[ModelProfile],
        capacities: Sequence[StageCapacity],
        spec: PlanSpec,
    ) -> _Problem:
        if not capacities:
            raise InvalidArgument("no stages to plan for")
        if isinstance(profile, ModelProfile):
            profiles = (profile,) * len(capacities)
        else:
            profiles = tuple(profile)
            if len(profiles) != len(capacities):
                raise InvalidArgument(f"{len(profiles)} profiles for {len(capacities)} stages")
            profile = profiles[0]
        total = len(capacities)
        n = total if spec.num_partitions is None else spec.num_partitions
        if not 1 <= n <= total:
            raise InvalidArgument(
                f"num_partitions must be between 1 and the {total} stage(s) given, got {n}"
            )
        if n > profile.num_layers:
            raise InvalidArgument(
                f"cannot split {profile.num_layers} layers over {n} stages: every stage needs "
                "at least one layer"
            )
        stages = tuple(capacities[:n])
        given = spec.max_memory_bytes
        if not given:
            limits = tuple(c.memory_bytes for c in stages)
        elif len(given) == 1:
            limits = given * n
        elif len(given) == n:
            limits = given
        else:
            raise InvalidArgument(
                f"{len(given)} memory limits for {n} stages: give one limit for every stage or "
                f"exactly one per stage ({n})"
            )
        if any(limit < 0 for limit in limits):
            raise InvalidArgument(f"memory limits must be >= 0 bytes, got {limits}")
        return cls(profiles[:n], stages, tuple(int(x) for x in limits))

    @property
    def profile(self) -> ModelProfile:
        """Layers and FLOPs, the same at every format."""
        return self.profiles[0]

    @property
    def n(self) -> int:
        return len(self.stages)

    @property
    def num_layers(self) -> int:
        return self.profile.num_layers

    def _ends(self, i: int) -> tuple[bool, bool]:
        return i == 0, i == self.n - 1

    @cached_property
    def _prefix_bytes(self) -> dict[int, tuple[int, ...]]:
        """Per distinct profile (by identity), the running sum of its layer bytes."""
        return {id(p): (0, *accumulate(p.layer_bytes)) for p in self.profiles}

    def _layer_bytes(self, i: int, r: LayerRange) -> int:
        prefix = self._prefix_bytes[id(self.profiles[i])]
        return prefix[r.end] - prefix[r.start]

    def need(self, i: int, r: LayerRange) -> tuple[int, int]:
        """(weight bytes, KV budget) of stage i serving r."""
        first, last = self._ends(i)
        weights = self.profiles[i].stage_weight_bytes(r, first, last)
        return weights, self.stages[i].kv_budget_bytes

    def fits(self, i: int, r: LayerRange) -> bool:
        first, last = self._ends(i)
        weights = self._layer_bytes(i, r) + self.profiles[i].fixed_bytes(first, last)
        return weights + self.stages[i].kv_budget_bytes <= self.limits[i]

    def time(self, i: int, r: LayerRange) -> float:
        first, last = self._ends(i)
        return estimate_ms_per_token(self.profile, self.stages[i], r, first, last)

    def fill(self, i: int, r: LayerRange) -> float:
        """Layer bytes / memory left for layers after the fixed parts. A float: it only ranks
        splits that fit (`fits` decides that in exact integers), and rounding is monotone, so
        it can at worst turn a near-tie into a tie (then settled by stage times, boundaries);
        Fractions were 5x slower on 126 layers over 32 stages."""
        first, last = self._ends(i)
        layers = self._layer_bytes(i, r)
        room = self.limits[i] - self.stages[i].kv_budget_bytes
        room -= self.profiles[i].fixed_bytes(first, last)
        # Only asked of segments that fit (layers <= room), so room <= 0 means no layer bytes.
        return layers / room if room > 0 else 0.0

    def shortfall(self, i: int, r: LayerRange) -> int:
        return max(0, sum(self.need(i, r)) - self.limits[i])

    def describe(self, i: int, r: LayerRange) -> str:
        weights, kv = self.need(i, r)
        short = weights + kv - self.limits[i]
        return (
            f"stage {i} ({self.stages[i].address}, layers {r}) needs {short:,} bytes more than "
            f"its limit of {self.limits[i]:,} (weights {_human(weights)} + KV budget "
            f"{_human(kv)})"
        )

    def check_memory(self, ranges: Sequence[LayerRange], strategy: Strategy) -> None:
        over = [(self.shortfall(i, r), i) for i, r in enumerate(ranges) if not self.fits(i, r)]
        if not over:
            return
        worst = max(over, key=lambda x: (x[0], -x[1]))[1]
        message = self.describe(worst, ranges[worst])
        if len(over) > 1:
            total = sum(s for s, _ in over)
            message += f"; {len(over)} stages are over their limits, {total:,} bytes short in all"
        hint = (
            ""
            if strategy in (Strategy.MEMORY, Strategy.MIXED)
            else " (the memory and mixed strategies find a split that fits when there is one)"
        )
        raise InvalidArgument(f"the {strategy.value} plan does not fit: {message}{hint}")

    def raise_no_split_fits(self, strategy: Strategy) -> None:
        ranges = _min_total_shortfall(self)
        over = [(self.shortfall(i, r), i) for i, r in enumerate(ranges)]
        total = sum(s for s, _ in over)
        worst = max(over, key=lambda x: (x[0], -x[1]))[1]
        raise InvalidArgument(
            f"no split of {self.num_layers} layers over {self.n} stages fits the memory limits "
            f"({strategy.value} strategy); the closest ({' | '.join(map(str, ranges))}) is "
            f"{total:,} bytes short in all, and {self.describe(worst, ranges[worst])}"
        )


def _human(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


Metric = Callable[[int, LayerRange], object]


def _best_split(
    problem: _Problem,
    metrics: list[Metric],
    allowed: Callable[[int, LayerRange], bool] | None = None,
) -> tuple[LayerRange, ...] | None:
    """The contiguous split (>= 1 layer per stage, segments `allowed`) that is least in the
    order: for each metric in turn, the stage values sorted largest first, compared
    lexicographically; then the boundaries, earliest first. None when no split is allowed.

    Exact by dynamic programming: best[j][e] is the least key of stages 0..j-1 covering layers
    0..e-1. Appending the same stage value to two sorted vectors keeps their order (and an
    equal-value tie then falls to the boundaries), so the least prefix extends to the least
    whole. O(stages^2 * layers^2)."""
    n, num_layers = problem.n, problem.num_layers
    # key = (one vector per metric, its stage values sorted largest first; the stage starts):
    # plain tuple order is then the leximax order, then the earliest boundaries.
    best: list[dict[int, tuple]] = [{0: (tuple(() for _ in metrics), ())}]
    for j in range(n):
        current: dict[int, tuple] = {}
        ends = [num_layers] if j == n - 1 else range(j + 1, num_layers - (n - j - 1) + 1)
        for e in ends:
            cand = None
            for s, (vectors, starts) in best[j].items():
                if s >= e:
                    continue
                r = LayerRange(s, e)
                if allowed is not None and not allowed(j, r):
                    continue
                new_vectors = []
                for vec, metric in zip(vectors, metrics, strict=True):
                    new_vectors.append(tuple(sorted((*vec, metric(j, r)), reverse=True)))
                key = (tuple(new_vectors), starts + (s,))
                if cand is None or key < cand:
                    cand = key
            if cand is not None:
                current[e] = cand
        best.append(current)
    if num_layers not in best[n]:
        return None
    starts = best[n][num_layers][1]
    return tuple(LayerRange(s, e) for s, e in zip(starts, starts[1:] + (num_layers,), strict=True))


def _min_total_shortfall(problem: _Problem) -> tuple[LayerRange, ...]:
    """The split with the fewest bytes over the limits in all (then earliest boundaries), for
    the message when none fits. Additive, so the same dynamic programme is exact."""
    n, num_layers = problem.n, problem.num_layers
    best: dict[int, tuple[int, tuple[int, ...]]] = {0: (0, ())}
    for j in range(n):
        current: dict[int, tuple[int, tuple[int, ...]]] = {}
        ends = [num_layers] if j == n - 1 else range(j + 1, num_layers - (n - j - 1) + 1)
        for e in ends:
            cands = [
                (total + problem.shortfall(j, LayerRange(s, e)), starts + (s,))
                for s, (total, starts) in best.items()
                if s < e
            ]
            if cands:
                current[e] = min(cands)
        best = current
    starts = best[num_layers][1]
    return tuple(LayerRange(s, e) for s, e in zip(starts, starts[1:] + (num_layers,), strict=True))


def _check_custom(ranges: Sequence[LayerRange], problem: _Problem) -> tuple[LayerRange, ...]:
    num_layers, n = problem.num_layers, problem.n
    if not ranges:
        raise InvalidArgument("the custom strategy needs one layer range per stage, e.g. 0-9,10-29")
    if len(ranges) != n:
        raise InvalidArgument(
            f"{len(ranges)} custom layer range(s) for {n} stage(s): give exactly one per stage"
        )
    check_contiguous(ranges, num_layers, "custom range")
    return tuple(ranges)
