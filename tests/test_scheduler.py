"""The scheduler loop (orchestrator/scheduler.py) against a link that records what it is sent,
answered by the test through the router's in-flight table, as a stage's answers arrive: the loop
makes each stream's next step from its answer, sends a cohort as one message, waits for a
laggard once, parks a stream its consumer does not read, holds its steps for a reload, and ends
a stream at eos, at its limit, at a failure and at a new epoch."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from orchestrator.inflight import InFlight
from orchestrator.scheduler import LOOKAHEAD, Scheduler, Stream, cohorts_for
from protos import llamadist_pb2 as pb


class Link:
    """Records each message (a list of steps) it is sent, as a copy: a real link serializes
    the steps as it sends them, and the loop rewrites a stream's step for its next one."""

    def __init__(self):
        self.messages: queue.SimpleQueue = queue.SimpleQueue()

    def send(self, steps: list[pb.StepRequest]) -> None:
        self.messages.put([pb.StepRequest.FromString(s.SerializeToString()) for s in steps])

    def next(self, timeout_s: float = 5) -> list[pb.StepRequest]:
        return self.messages.get(timeout=timeout_s)

    def quiet(self, wait_s: float = 0.2) -> bool:
        time.sleep(wait_s)
        return self.messages.empty()


class Mesh:
    def __init__(self, max_wait_s: float = 10.0):
        self.inflight = InFlight()
        self.epoch = 1
        self.scheduler = Scheduler(self.inflight, lambda: self.epoch, max_wait_s)
        self.link = Link()

    def stream(self, session_id: str, left: int = 100, stop_ids=(), position: int = 5,
               keep_going=lambda: True) -> Stream:  # fmt: skip
        template = pb.StepRequest(session_id=session_id, plan_epoch=self.epoch, route=["a"])
        return self.scheduler.open(
            Stream(session_id, self.link, template, position, 7, left, frozenset(stop_ids),
                   keep_going)
        )  # fmt: skip

    def answer(self, steps: list[pb.StepRequest], token: int = 8, **reply) -> None:
        for step in steps:
            self.inflight.complete(
                pb.StepReply(request_id=step.request_id, token_id=token, **reply)
            )


def taken(stream: Stream, scheduler: Scheduler, timeout_s: float = 5):
    """The stream's next answer as its session takes it: a StepReply, or None once it ended."""
    item = stream.answers.get(timeout=timeout_s)
    if item is None:
        return None
    scheduler.consumed(stream)
    return item[0].reply


@pytest.fixture
def mesh():
    m = Mesh()
    yield m
    m.scheduler.close()


def test_the_loop_makes_each_next_step_from_the_answer_until_the_limit(mesh):
    s = mesh.stream("s", left=3)
    for i, token in enumerate((10, 11, 12)):
        (step,) = mesh.link.next()
        assert (step.start_pos, list(step.token_ids)) == (5 + i, [10 + i - 1 if i else 7])
        mesh.answer([step], token)
        assert taken(s, mesh.scheduler).token_id == token
    assert taken(s, mesh.scheduler) is None and mesh.link.quiet()


def test_eos_and_a_failed_step_end_the_stream_after_their_answer(mesh):
    s = mesh.stream("eos", stop_ids={2})
    mesh.answer(mesh.link.next(), token=2)
    assert taken(s, mesh.scheduler).token_id == 2 and taken(s, mesh.scheduler) is None
    f = mesh.stream("fails")
    mesh.answer(mesh.link.next(), error_code=14, error_message="stage 1 is gone")
    assert taken(f, mesh.scheduler).error_code == 14 and taken(f, mesh.scheduler) is None
    assert mesh.link.quiet()


def names(steps: list[pb.StepRequest]) -> list[str]:
    return sorted(s.session_id for s in steps)


def test_a_cohort_goes_as_one_message_once_every_member_queued(mesh):
    mesh.stream("s0")
    first = mesh.link.next()  # s0 alone: the only member when it queued
    mesh.stream("s1"), mesh.stream("s2")
    assert mesh.link.quiet()  # s1 and s2 wait for s0, whose step is out (max wait 10 s)
    mesh.answer(first)
    # the answer that completed the cohort sent it on the answering thread, not the loop's
    assert mesh.link.messages.qsize() == 1
    together = mesh.link.next()
    assert names(together) == ["s0", "s1", "s2"]
    mesh.answer(together)  # one reply message: the next steps go as one again
    assert names(mesh.link.next()) == ["s0", "s1", "s2"]


def test_a_member_not_on_its_way_is_waited_for_once_then_not_until_it_queues():
    m = Mesh(max_wait_s=0.3)
    try:
        m.stream("p")
        for _ in range(LOOKAHEAD):
            m.answer(m.link.next())  # p's answers stay unread: it parks, no step queued or out
        t0 = time.monotonic()
        a = m.stream("a")
        (step,) = m.link.next()  # waited for p once
        assert step.session_id == "a" and time.monotonic() - t0 >= 0.3
        t0 = time.monotonic()
        m.answer([step])  # p is late now: a's next goes at once
        assert taken(a, m.scheduler).token_id == 8
        assert names(m.link.next()) == ["a"] and time.monotonic() - t0 < 0.25
    finally:
        m.scheduler.close()


def test_steps_wait_for_members_on_their_way_so_that_pieces_merge(monkeypatch):
    """A session that joins while the cohort is out waits for the cohort's answers (not just
    max_wait_s), and they go on as one batch; a step whose answer never comes holds the others
    back at most MAX_MERGE_WAIT_S a tick."""
    monkeypatch.setattr("orchestrator.scheduler.MAX_MERGE_WAIT_S", 0.4)
    m = Mesh(max_wait_s=0.01)
    m.scheduler.round_s = 1.0  # as measured: the merge wait is its cap
    try:
        m.stream("a")
        first = m.link.next()
        m.stream("b")  # a is out: b waits for it
        time.sleep(0.1)  # ten times max_wait_s
        assert m.link.messages.empty()
        m.answer(first)
        together = m.link.next()
        assert names(together) == ["a", "b"]
        t0 = time.monotonic()
        m.answer([s for s in together if s.session_id == "b"])  # a's answer never comes
        assert names(m.link.next()) == ["b"]
        assert 0.4 <= time.monotonic() - t0 < 2
    finally:
        m.scheduler.close()


def test_a_joiner_waits_for_the_rest_of_the_cohorts_round_only(monkeypatch):
    """The cohort's answers are due about a round after it went: a session that joins late in
    that round waits for what is left of it (1.5 rounds after the cohort went), not a whole
    round of its own."""
    monkeypatch.setattr("orchestrator.scheduler.MAX_MERGE_WAIT_S", 5.0)
    m = Mesh(max_wait_s=0.01)
    m.scheduler.round_s = 0.4  # as measured: the cohort's answers are due 0.6 s after it went
    try:
        m.stream("a")
        m.link.next()  # a's step goes at once (never answered here)
        time.sleep(0.45)
        t0 = time.monotonic()
        m.stream("b")
        assert names(m.link.next()) == ["b"]  # after the rest of a's 0.6 s, not 0.6 s more
        assert 0.05 <= time.monotonic() - t0 < 0.45
    finally:
        m.scheduler.close()


def test_members_spread_over_cohorts_and_each_goes_apart(mesh):
    mesh.stream("s0")
    first = mesh.link.next()
    for i in (1, 2, 3):
        mesh.stream(f"s{i}")
    mesh.scheduler.set_cohorts(2)  # s0, s2 | s1, s3
    assert names(mesh.link.next()) == ["s1", "s3"]  # not held back by s0's cohort
    mesh.answer(first)
    assert names(mesh.link.next()) == ["s0", "s2"]


def test_a_stream_its_session_does_not_read_parks_after_the_lookahead(mesh):
    s = mesh.stream("slow")
    for _ in range(LOOKAHEAD):
        mesh.answer(mesh.link.next())
    assert mesh.link.quiet()  # LOOKAHEAD answers unread: no further step
    taken(s, mesh.scheduler)
    assert len(mesh.link.next()) == 1


def test_a_reload_waits_for_the_steps_out_and_a_new_epoch_ends_the_streams(mesh):
    s = mesh.stream("s")
    out = mesh.link.next()
    entered = queue.SimpleQueue()

    def reload():
        with mesh.scheduler.paused():
            entered.put(True)
            mesh.epoch = 2
            time.sleep(0.2)

    t = threading.Thread(target=reload)
    t.start()
    time.sleep(0.2)
    assert entered.empty()  # the step is still out
    mesh.answer(out)
    assert entered.get(timeout=5)
    t.join(5)
    assert taken(s, mesh.scheduler).token_id == 8
    assert taken(s, mesh.scheduler) is None and mesh.link.quiet()  # its next was epoch 1


def test_a_reload_fails_a_step_whose_answer_never_comes_rather_than_wait_forever(mesh, monkeypatch):
    """An answer lost with a stage that died: after SETTLE_S the step fails as unavailable
    (its session fails over) and the reload goes ahead."""
    monkeypatch.setattr("orchestrator.scheduler.SETTLE_S", 0.5)
    s = mesh.stream("lost")
    mesh.link.next()  # never answered
    t0 = time.monotonic()
    with mesh.scheduler.paused():
        waited = time.monotonic() - t0
        mesh.epoch = 2
    assert 0.5 <= waited < 5
    answer = s.answers.get(timeout=5)
    assert answer[0].error is not None and "no answer to a decode step" in str(answer[0].error)
    assert s.answers.get(timeout=5) is None  # the stream ended with the failure


def test_a_closed_stream_forgets_its_step_and_drops_a_late_answer(mesh):
    s = mesh.stream("gone")
    out = mesh.link.next()
    mesh.scheduler.close_stream(s)
    mesh.answer(out)
    assert s.answers.get(timeout=5) is None and s.answers.empty() and mesh.link.quiet()


def test_the_first_step_is_made_even_when_the_session_wants_its_own_next(mesh):
    s = mesh.stream("drafts", keep_going=lambda: False)
    mesh.answer(mesh.link.next())
    assert taken(s, mesh.scheduler) is not None and taken(s, mesh.scheduler) is None


def info(device: str) -> pb.StageInfo:
    return pb.StageInfo(device=device)


def test_cohorts_are_the_routes_distinct_devices():
    shared = [(info("cuda:0"), "10.0.0.1:7001"), (info("cuda:0"), "10.0.0.1:7002")]
    assert cohorts_for(shared) == 1  # one GPU: one batch reads the weights once a token
    assert cohorts_for([(info("cuda:0"), "a:1"), (info("cuda:1"), "a:2")]) == 2
    assert cohorts_for([(info("cuda:0"), "a:1"), (info("cuda:0"), "b:1")]) == 2
    assert cohorts_for([(info("cpu"), "a:1"), (info("cpu"), "a:2"), (info("cpu"), "a:3")]) == 3
    assert cohorts_for([]) == 1


def test_a_mesh_reports_its_cohorts_and_streams_equal_transformers(tiny):
    """Through real stages: CPU stages are a cohort each (auto), `cohorts` overrides it, and
    sessions decoding together by stream get transformers' greedy tokens."""
    from tests.conftest import in_process_mesh, reference_greedy

    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    for cohorts, expected in ((0, 2), (1, 1)):
        with in_process_mesh(tiny, 2, cohorts=cohorts, speculate="off") as mesh:
            replies = [None] * len(prompts)

            def one(i, replies=replies, mesh=mesh):
                replies[i] = mesh.client.generate(
                    token_ids=prompts[i], max_new_tokens=12, ignore_eos=True
                )

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            for prompt, reply in zip(prompts, replies, strict=True):
                assert reply.token_ids == reference_greedy(tiny, prompt, 12)
                assert int(reply.timings["cohorts"]) == expected
