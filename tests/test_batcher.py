"""The stage's compute thread (stage_service/batcher.py): a failing callback or batch never ends
it; if it dies anyway, callers get Unavailable at once and Health says NOT_SERVING; queued work
whose caller is gone or whose session ended is dropped, not computed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch

from protos.errors import Cancelled, Unavailable
from stage_service.batcher import INLINE_MAX_ROWS, Batcher, Job
from stage_service.config import StageConfig
from stage_service.stage import Stage
from tests.conftest import make_tiny_model


@dataclass
class Step:
    session_id: str
    token_ids: list[int] = field(default_factory=lambda: [1])
    return_logits: bool = False


class Recorder:
    """A run_batch that records what it ran and can be held (to queue work behind it)."""

    def __init__(self):
        self.ran: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.raise_: BaseException | None = None

    def __call__(self, jobs: list[Job]) -> None:
        self.hold.wait(10)
        self.ran.append([j.step.session_id for j in jobs])
        if self.raise_ is not None:
            raise self.raise_
        for job in jobs:
            job.out = job.step.session_id


def submit_in_thread(batcher: Batcher, step: Step, outcomes: dict, **kwargs) -> threading.Thread:
    def run():
        try:
            outcomes[step.session_id] = batcher.submit(step, **kwargs)
        except Exception as err:  # noqa: BLE001 - the outcome under test
            outcomes[step.session_id] = err

    t = threading.Thread(target=run)
    t.start()
    return t


def wait_queued(batcher: Batcher, n: int) -> None:
    for _ in range(1000):
        if len(batcher._queue) == n:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"{len(batcher._queue)} queued, expected {n}")


def test_a_callback_that_raises_does_not_end_the_compute_thread():
    run = Recorder()
    batcher = Batcher(run, max_batch=8, max_batch_tokens=64)
    done = threading.Event()

    def bad_callback():
        done.set()
        raise RuntimeError("a caller's bug")

    batcher.submit_many([Job(Step("a"))], bad_callback)
    assert done.wait(5)
    outcomes: dict = {}
    submit_in_thread(batcher, Step("b"), outcomes).join(5)
    assert outcomes == {"b": "b"} and batcher.alive
    batcher.close()


def test_a_failing_batch_fails_its_callers_and_the_thread_goes_on():
    run = Recorder()
    run.raise_ = RuntimeError("the forward failed")
    batcher = Batcher(run, max_batch=8, max_batch_tokens=64)
    outcomes: dict = {}
    submit_in_thread(batcher, Step("a"), outcomes).join(5)
    assert isinstance(outcomes["a"], RuntimeError)
    run.raise_ = None
    submit_in_thread(batcher, Step("b"), outcomes).join(5)
    assert outcomes["b"] == "b"
    batcher.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_compute_thread_answers_every_caller_and_turns_health_off(tmp_path):
    stage = Stage(StageConfig(model=str(make_tiny_model(tmp_path, "gqa"))))
    stage.load_layers(0, 4, epoch=1)
    assert stage.ready() == (True, "")
    run = Recorder()
    run.hold.clear()
    stage.batcher.close()
    stage.batcher = batcher = Batcher(run, max_batch=1, max_batch_tokens=64)
    run.raise_ = SystemExit("stop")  # not an Exception: the thread really ends
    outcomes: dict = {}
    first = submit_in_thread(batcher, Step("running"), outcomes)
    wait_queued(batcher, 0)
    queued = submit_in_thread(batcher, Step("queued"), outcomes)
    wait_queued(batcher, 1)
    run.hold.set()
    first.join(5)
    queued.join(5)
    assert not first.is_alive() and not queued.is_alive(), "a caller still waits"
    assert isinstance(outcomes["running"], Unavailable)
    assert isinstance(outcomes["queued"], Unavailable)
    assert "compute thread died" in str(outcomes["queued"])
    with pytest.raises(Unavailable, match="compute thread died"):
        batcher.submit(Step("later"))
    ok, detail = stage.ready()
    assert not ok and "compute thread died" in detail


def test_queued_work_of_an_ended_session_or_a_gone_caller_is_dropped():
    run = Recorder()
    run.hold.clear()
    batcher = Batcher(run, max_batch=8, max_batch_tokens=64)
    outcomes: dict = {}
    gone = threading.Event()
    threads = [submit_in_thread(batcher, Step("first"), outcomes)]
    wait_queued(batcher, 0)
    threads += [
        submit_in_thread(batcher, Step("ended"), outcomes),
        submit_in_thread(batcher, Step("abandoned"), outcomes, cancelled=gone.is_set),
        submit_in_thread(batcher, Step("kept"), outcomes),
    ]
    wait_queued(batcher, 3)
    assert batcher.drop("ended") == 1
    gone.set()
    run.hold.set()
    for t in threads:
        t.join(5)
    assert isinstance(outcomes["ended"], Cancelled)
    assert isinstance(outcomes["abandoned"], Cancelled)
    assert outcomes["first"] == "first" and outcomes["kept"] == "kept"
    assert run.ran == [["first"], ["kept"]]  # neither dropped job was computed
    batcher.close()


class ThreadRecorder(Recorder):
    """Also records the thread each batch ran on."""

    def __init__(self):
        super().__init__()
        self.threads: list[int] = []

    def __call__(self, jobs: list[Job]) -> None:
        self.threads.append(threading.get_ident())
        super().__call__(jobs)


def test_a_small_batch_for_an_idle_compute_thread_runs_on_the_thread_that_brings_it():
    run = ThreadRecorder()
    batcher = Batcher(run, max_batch=8, max_batch_tokens=64)
    done = threading.Event()
    try:
        batcher.submit_many([Job(Step("a")), Job(Step("b"))], done.set, inline=True)
        assert done.is_set()  # ran and answered before submit_many returned
        assert run.ran == [["a", "b"]] and run.threads == [threading.get_ident()]
        # not asked to (a message behind it), too many rows, or one session twice: queued
        many = Step("c", token_ids=list(range(INLINE_MAX_ROWS + 1)))
        for jobs, inline in (
            ([Job(Step("x"))], False),
            ([Job(many)], True),
            ([Job(Step("d")), Job(Step("d"))], True),
        ):
            queued = threading.Event()
            batcher.submit_many(jobs, queued.set, inline=inline)
            assert queued.wait(5)
            assert run.threads[-1] != threading.get_ident()
    finally:
        batcher.close()


def test_a_small_batch_that_comes_while_one_runs_is_queued_and_batched_with_the_rest():
    run = ThreadRecorder()
    batcher = Batcher(run, max_batch=8, max_batch_tokens=64)
    try:
        run.hold.clear()
        first = threading.Event()
        batcher.submit_many([Job(Step("a"))], first.set)  # the compute thread runs it, held
        for _ in range(1000):
            if batcher._running:
                break
            threading.Event().wait(0.005)
        later = [threading.Event(), threading.Event()]
        batcher.submit_many([Job(Step("b"))], later[0].set, inline=True)
        batcher.submit_many([Job(Step("c"))], later[1].set, inline=True)
        assert not later[0].is_set()  # queued, not run here: submit_many returned at once
        run.hold.set()
        assert first.wait(5) and all(e.wait(5) for e in later)
        assert run.ran == [["a"], ["b", "c"]]
        assert threading.get_ident() not in run.threads
    finally:
        batcher.close()


@dataclass
class RowsStep(Step):
    hidden: torch.Tensor = field(default_factory=lambda: torch.ones(1, 4))


def test_an_inline_batch_with_a_step_whose_caller_is_gone_answers_it_and_the_stage_goes_on():
    run = ThreadRecorder()
    batcher = Batcher(run, max_batch=8, max_batch_tokens=64)
    try:
        jobs = [Job(RowsStep("gone"), cancelled=lambda: True), Job(RowsStep("here"))]
        done = threading.Event()
        batcher.submit_many(jobs, done.set, inline=True)
        assert done.is_set() and run.ran == [["here"]]
        assert isinstance(jobs[0].error, Cancelled) and jobs[1].out == "here"
        assert batcher.submit(RowsStep("next")) == "next"  # the compute thread still takes work
    finally:
        batcher.close()
