"""The stage: one layer range (range_holder.py) served one batch at a time on a compute thread
(batcher.py runs batch_runner.py). What its gRPC servicer and the in-process callers (the
orchestrator's draft model, tests) call. No gRPC in here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

from protos.errors import InvalidArgument, NotFound
from protos.shared.model_files import LlamaArgs
from stage_service.batch_runner import BatchRunner
from stage_service.batcher import Batcher, Job
from stage_service.config import StageConfig
from stage_service.info import stage_info
from stage_service.metrics import StageMetrics
from stage_service.range_holder import LoadedRange, RangeHolder
from stage_service.steps import StepInput, StepOutput, check_step, non_finite
from stage_service.weight_cache import Entry, OfferAnswer


def non_finite_error() -> InvalidArgument:
    return InvalidArgument("hidden state contains NaN or Inf")


class Stage:
    def __init__(
        self,
        config: StageConfig,
        around_batch: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ):
        """`around_batch()`: the block the compute thread runs each batch and hands out its
        results in (the forwarder's `holding`: a batch's steps go on as one message)."""
        self.config = config
        self.holder = RangeHolder(config)
        self.metrics = StageMetrics(self.info)
        runner = BatchRunner(self.holder, self.metrics, config.use_batch_invariant)
        self.batcher = Batcher(runner.run, config.max_batch, config.max_batch_tokens, around_batch)

    # ------------------------------------------------------------------ the range held

    def load_layers(
        self, start: int, end: int, epoch: int, peers: frozenset[str] = frozenset()
    ) -> None:
        self.holder.load_layers(start, end, epoch, peers)

    def drop_layers(self, epoch: int) -> None:
        self.holder.drop_layers(epoch)

    def offer_weights(
        self, fingerprint: str, config_json: str, entries: list[Entry]
    ) -> OfferAnswer:
        return self.holder.offer_weights(fingerprint, config_json, entries)

    def receive_weights(self, chunks) -> tuple[int, int]:
        return self.holder.receive_weights(chunks)

    def info(self) -> dict:
        return stage_info(self.holder)

    def close(self) -> None:
        """Ends the compute thread (what is queued is answered Unavailable) and releases the
        weights cache: for a stage stopped in a process that goes on (tests)."""
        self.batcher.close()
        self.holder.close()

    @property
    def loaded(self) -> LoadedRange | None:
        return self.holder.loaded

    @property
    def epoch(self) -> int:
        return self.holder.epoch

    @property
    def args(self) -> LlamaArgs | None:
        return self.holder.args

    @property
    def fingerprint(self) -> str:
        return self.holder.fingerprint

    # ------------------------------------------------------------------ steps

    def ready(self) -> tuple[bool, str]:
        if not self.batcher.alive:
            return False, f"the compute thread died ({self.batcher.died}); restart the stage"
        if self.holder.loaded is None:
            return False, "no layers loaded yet; the orchestrator assigns them"
        return True, ""

    def run_step(self, step: StepInput, cancelled: Callable[[], bool] | None = None) -> StepOutput:
        """Validates the step and runs it in the next batch of the compute thread (unless
        `cancelled()` says its caller is gone by then)."""
        self._check(step, self.holder.require_loaded())
        if non_finite([step])[0]:
            raise non_finite_error()
        return self.batcher.submit(step, cancelled)

    def run_steps(
        self,
        steps: list[StepInput],
        on_done: Callable[[list[Job]], None],
        cancelled: Callable[[], bool] | None = None,
        inline: bool = False,
    ) -> None:
        """Queues the valid steps together (one batch where they fit) without waiting;
        `on_done(jobs)` runs once, on the compute thread, when all are done: one job per step in
        order, each with its out or its error (a step that fails validation is never queued; if
        none is queued, on_done runs here). No layers or shutting down raise here. Steps still
        queued when `cancelled()` turns true are dropped (answered Cancelled). `inline`: the
        caller has nothing else for this stage now (Batcher.submit_many)."""
        loaded = self.holder.require_loaded()
        jobs = [Job(step, cancelled=cancelled) for step in steps]
        queued = []
        for job in jobs:
            try:
                self._check(job.step, loaded)
                queued.append(job)
            except Exception as err:  # noqa: BLE001 - that step's own failure
                job.error = err
        bad = non_finite([job.step for job in queued])
        for job in (j for j, b in zip(queued, bad, strict=True) if b):
            job.error = non_finite_error()
        queued = [j for j, b in zip(queued, bad, strict=True) if not b]
        if queued:
            self.batcher.submit_many(queued, lambda: on_done(jobs), inline)
        else:
            on_done(jobs)

    def end_session(self, session_id: str) -> int:
        """Frees the session's cache; its queued steps are dropped (answered Cancelled)."""
        loaded = self.holder.require_loaded()
        dropped = self.batcher.drop(session_id)
        try:
            return loaded.cache.end(session_id)
        except NotFound:
            if dropped:
                return 0  # only queued work: nothing was cached yet
            raise

    def _check(self, step: StepInput, loaded: LoadedRange) -> None:
        check_step(step, loaded.epoch, loaded.model.weights, self.holder.args, self.holder.dtype)
