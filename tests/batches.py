"""Test-only views of a stage's compute thread."""

from __future__ import annotations

from collections.abc import Callable


def count_taken(stage) -> Callable[[], int]:
    """From now on, how many jobs the compute thread of `stage` (a stage_service.stage.Stage)
    has taken into batches: it counts them as each batch starts to run, before the run takes
    the stage's compute lock (a test holding that lock sees a batch taken, and waiting)."""
    taken = [0]
    run = stage.batcher.run_batch

    def counting(jobs: list) -> None:
        taken[0] += len(jobs)
        run(jobs)

    stage.batcher.run_batch = counting
    return lambda: taken[0]
