"""One compute thread per stage that runs the steps waiting for it as one batched forward.

Whatever is queued when the thread becomes free goes into the next batch: decode steps of many
sessions (and prefills) share each matmul, one segment per session (model.Segment). Nothing
waits for a batch to fill, so a lone session pays no extra latency; under load the batch grows
with the queue. A step that asks for full logits runs alone (they are per row of its batch).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from protos.errors import Unavailable


@dataclass
class Job:
    step: object  # stage.StepInput
    out: object = None  # stage.StepOutput once done
    error: BaseException | None = None
    on_done: Callable[[Job], None] | None = None  # called on the compute thread when done


class Batcher:
    def __init__(
        self, run_batch: Callable[[list[Job]], None], max_batch: int, max_batch_tokens: int
    ):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self._queue: deque[Job] = deque()
        self.taken = 0  # jobs taken into batches so far
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="compute", daemon=True)
        self._thread.start()

    def submit(self, step) -> object:
        """Runs a step in the next batch and returns its output."""
        job, done = Job(step), threading.Event()
        self.submit_many([job], done.set)
        done.wait()
        if job.error is not None:
            raise job.error
        return job.out

    def submit_many(self, jobs: list[Job], on_done: Callable[[], None]) -> None:
        """Queues `jobs` together, so that those that fit (distinct sessions, within max_batch
        and max_batch_tokens) run in one forward; `on_done()` runs once, on the compute thread,
        when the last of them is done."""
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
            if self._closed:
                raise Unavailable("the stage is shutting down")
            self._queue.extend(jobs)
            self._cond.notify()

    def _next_batch(self) -> list[Job]:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            if self._closed:
                return []
            batch = [self._queue.popleft()]
            if batch[0].step.return_logits:
                self.taken += 1
                return batch
            sessions = {batch[0].step.session_id}
            tokens = len(batch[0].step.token_ids)
            kept: deque[Job] = deque()
            while self._queue and len(batch) < self.max_batch:
                job = self._queue.popleft()
                n = len(job.step.token_ids)
                if (
                    job.step.return_logits
                    or job.step.session_id in sessions
                    or tokens + n > self.max_batch_tokens
                ):
                    kept.append(job)  # next time, in order
                    continue
                batch.append(job)
                sessions.add(job.step.session_id)
                tokens += n
            self._queue.extendleft(reversed(kept))
            self.taken += len(batch)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            try:
                self.run_batch(batch)
            except BaseException as err:  # noqa: BLE001 - handed to every waiting caller
                for job in batch:
                    if job.out is None and job.error is None:
                        job.error = err
            for job in batch:
                if job.on_done is not None:
                    job.on_done(job)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.error = Unavailable("the stage is shutting down")
            if job.on_done is not None:
                job.on_done(job)
