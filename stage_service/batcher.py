"""One compute thread per stage that runs the steps waiting for it as one batched forward.

Whatever is queued when the thread becomes free goes into the next batch: decode steps of many
sessions (and prefills) share each matmul, one segment per session (model.Segment). Nothing
waits for a batch to fill, so a lone session pays no extra latency; under load the batch grows
with the queue. A step that asks for full logits runs alone (they are per row of its batch).

A small batch that arrives while the compute thread is idle, with nothing else waiting for it on
its way in, runs on the thread that brought it (`inline`): waking the compute thread cost a
thread hand-off a step, ~0.1-0.2 ms, and a lone session pays it at every stage. Larger batches,
and any that come while one runs, are queued: the thread that brings them goes back to reading,
so the next ones are decoded while this one runs.

Queued work whose caller is gone (`Job.cancelled`) or whose session was ended (`drop`) is
answered Cancelled instead of computed. If the compute thread ever dies, every waiting and later
job fails with Unavailable (and the stage's Health says NOT_SERVING): nobody waits forever.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from protos.errors import Cancelled, Unavailable

log = logging.getLogger(__name__)

INLINE_MAX_ROWS = 8  # the most input tokens a batch may hold to run on the thread that brings it


@dataclass(eq=False)  # a job is itself: its fields hold tensors
class Job:
    step: object  # stage.StepInput
    out: object = None  # stage.StepOutput once done
    error: BaseException | None = None
    on_done: Callable[[Job], None] | None = None  # called on the compute thread when done
    cancelled: Callable[[], bool] | None = None  # True once nobody waits for the answer


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[list[Job]], None],
        max_batch: int,
        max_batch_tokens: int,
        around_batch: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ):
        """`around_batch()`: the block each batch's run and its callbacks are in, on the
        compute thread (forwarding.Forwarder.holding: what the callbacks forward goes on as one
        message per next stage once the block ends)."""
        self.run_batch = run_batch
        self.around_batch = around_batch
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self._queue: deque[Job] = deque()
        self.died: str = ""  # why the compute thread ended, if it did other than by close()
        self._cond = threading.Condition()
        self._closed = False
        self._running = False  # a batch is running (on the compute thread, or inline)
        self._thread = threading.Thread(target=self._work, name="compute", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self.died

    def submit(self, step, cancelled: Callable[[], bool] | None = None) -> object:
        """Runs a step in the next batch and returns its output."""
        job, done = Job(step, cancelled=cancelled), threading.Event()
        self.submit_many([job], done.set)
        done.wait()
        if job.error is not None:
            raise job.error
        return job.out

    def submit_many(
        self, jobs: list[Job], on_done: Callable[[], None], inline: bool = False
    ) -> None:
        """Queues `jobs` together, so that those that fit (distinct sessions, within max_batch
        and max_batch_tokens) run in one forward; `on_done()` runs once, on the compute thread,
        when the last of them is done. `inline`: the caller has nothing else waiting (its
        stream holds no more messages); if the jobs are one small batch and the compute thread
        is idle, they run here and now, and on_done too."""
        left = [len(jobs)]
        lock = threading.Lock()  # the compute thread and close() may finish jobs of one group

        def one_done(_: Job) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                on_done()

        for job in jobs:
            job.on_done = one_done
        with self._cond:
            if self.died:
                raise Unavailable(f"the stage's compute thread died ({self.died})")
            if self._closed:
                raise Unavailable("the stage is shutting down")
            here = inline and not self._running and not self._queue and self._one_small(jobs)
            if here:
                self._running = True
            else:
                self._queue.extend(jobs)
                self._cond.notify()
        if here:
            self._run_inline(jobs)

    def _one_small(self, jobs: list[Job]) -> bool:
        """The jobs make one batch of at most INLINE_MAX_ROWS input tokens."""
        steps = [job.step for job in jobs]
        return (
            len(steps) <= self.max_batch
            and sum(len(s.token_ids) for s in steps) <= min(INLINE_MAX_ROWS, self.max_batch_tokens)
            and len({s.session_id for s in steps}) == len(steps)
            and (len(steps) == 1 or not any(s.return_logits for s in steps))
        )

    def _run_inline(self, jobs: list[Job]) -> None:
        try:
            batch, gone = [], []
            for job in jobs:
                (gone if job.cancelled is not None and job.cancelled() else batch).append(job)
            with self.around_batch():
                self._run(batch, gone)
        except Exception:  # a caller's bug must not end the calling thread
            log.exception("the block around a batch failed")
        finally:  # whatever happened, the compute thread takes the queue again
            with self._cond:
                self._running = False
                if self._queue:
                    self._cond.notify()  # what came meanwhile

    def drop(self, session_id: str) -> int:
        """Answers the session's queued (not yet running) jobs Cancelled; returns how many."""
        with self._cond:
            mine = [j for j in self._queue if j.step.session_id == session_id]
            if mine:
                self._queue = deque(j for j in self._queue if j.step.session_id != session_id)
        self._finish(mine, Cancelled(f"session {session_id!r} was ended"))
        return len(mine)

    def _next_batch(self) -> tuple[list[Job], list[Job]] | None:
        """The next batch (maybe empty), and the queued jobs nobody waits for any more; None
        once closed."""
        with self._cond:
            self._cond.wait_for(lambda: (self._queue and not self._running) or self._closed)
            if self._closed:
                return None
            self._running = True
            batch: list[Job] = []
            gone: list[Job] = []
            sessions: set[str] = set()
            tokens = 0
            kept: deque[Job] = deque()
            while self._queue and len(batch) < self.max_batch:
                job = self._queue.popleft()
                if job.cancelled is not None and job.cancelled():
                    gone.append(job)
                    continue
                n = len(job.step.token_ids)
                alone = job.step.return_logits
                if batch and (
                    alone
                    or batch[0].step.return_logits
                    or job.step.session_id in sessions
                    or tokens + n > self.max_batch_tokens
                ):
                    kept.append(job)  # next time, in order
                    continue
                batch.append(job)
                sessions.add(job.step.session_id)
                tokens += n
                if alone:
                    break
            self._queue.extendleft(reversed(kept))
            return batch, gone

    def _finish(self, jobs: list[Job], error: BaseException | None = None) -> None:
        for job in jobs:
            if error is not None and job.out is None and job.error is None:
                job.error = error
            if job.on_done is not None:
                try:
                    job.on_done(job)
                except Exception:  # a caller's bug must not end the compute thread
                    log.exception("a step's completion callback failed")

    def _work(self) -> None:
        batch: list[Job] = []
        try:
            while (taken := self._next_batch()) is not None:
                batch, gone = taken
                try:
                    with self.around_batch():
                        self._run(batch, gone)
                except Exception:  # a caller's bug must not end the compute thread
                    log.exception("the block around a batch failed")
                finally:
                    with self._cond:
                        self._running = False
                batch = []
        except BaseException as err:
            # SystemExit, KeyboardInterrupt, MemoryError...: this thread ends. Fail what waits
            # and refuse what comes, so that callers get an answer and Health turns NOT_SERVING.
            with self._cond:
                self.died = f"{type(err).__name__}: {err}"
                pending = list(self._queue)
                self._queue.clear()
            log.critical("the compute thread died: %s", self.died)
            self._finish(batch + pending, Unavailable(f"the stage's compute thread died ({err!r})"))
            raise

    def _run(self, batch: list[Job], gone: list[Job]) -> None:
        self._finish(gone, Cancelled("the step's caller is gone"))
        if batch:
            try:
                self.run_batch(batch)
                self._finish(batch)
            except Exception as err:  # noqa: BLE001 - handed to every waiting caller
                log.exception("a batch failed")
                self._finish(batch, err)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._finish(pending, Unavailable("the stage is shutting down"))
