"""The scheduler loop (orchestrator/scheduler.py) against links that record what they are sent:
a cohort goes as one message once every member queued, a member that lags is waited for once at
most, cohorts are sent apart, and a link that breaks fails its steps through the callback."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from orchestrator.scheduler import Scheduler, cohorts_for
from protos import llamadist_pb2 as pb
from protos.errors import Unavailable


class RecordingLink:
    def __init__(self, error: Exception | None = None):
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.error = error

    def send(self, steps: list[pb.StepRequest]) -> None:
        if self.error is not None:
            raise self.error
        self.messages.put(sorted(s.session_id for s in steps))

    def next(self, timeout_s: float = 5) -> list[str]:
        return self.messages.get(timeout=timeout_s)


def step(session_id: str) -> pb.StepRequest:
    return pb.StepRequest(session_id=session_id, token_ids=[1])


@pytest.fixture
def scheduler():
    failed = []
    s = Scheduler(lambda request, err: failed.append((request.session_id, str(err))), 10.0)
    s.failed = failed
    yield s
    s.close()


def test_a_cohort_goes_as_one_message_once_every_member_queued(scheduler):
    link = RecordingLink()
    members = [scheduler.member(f"s{i}") for i in range(3)]
    for m in members:
        m.__enter__()
    scheduler.send("s0", link, step("s0"))
    scheduler.send("s1", link, step("s1"))
    time.sleep(0.2)
    assert link.messages.empty()  # s2 has not queued: the cohort waits (max wait 10 s)
    scheduler.send("s2", link, step("s2"))
    assert link.next() == ["s0", "s1", "s2"]
    for m in members:
        m.__exit__(None, None, None)


def test_a_lagging_member_is_waited_for_once_then_not_until_it_queues():
    s = Scheduler(lambda request, err: None, max_wait_s=0.2)
    link = RecordingLink()
    try:
        with s.member("fast"), s.member("slow"):
            t0 = time.monotonic()
            s.send("fast", link, step("fast"))
            assert link.next() == ["fast"]
            assert time.monotonic() - t0 >= 0.2  # waited for "slow" up to max_wait_s
            t0 = time.monotonic()
            s.send("fast", link, step("fast"))
            assert link.next() == ["fast"] and time.monotonic() - t0 < 0.15  # "slow" is late
            s.send("slow", link, step("slow"))  # queues again: waited for from now on
            assert link.next() == ["slow"]
            s.send("fast", link, step("fast"))
            time.sleep(0.05)
            s.send("slow", link, step("slow"))
            assert link.next() == ["fast", "slow"]
    finally:
        s.close()


def test_members_spread_over_cohorts_and_each_cohort_goes_apart(scheduler):
    scheduler.set_cohorts(2)
    link = RecordingLink()
    sessions = [f"s{i}" for i in range(4)]
    members = [scheduler.member(s) for s in sessions]
    for m in members:
        m.__enter__()
    assert sorted(len(c.members) for c in scheduler.cohorts) == [2, 2]
    first = sorted(scheduler.cohorts[0].members)
    for s in first:
        scheduler.send(s, link, step(s))
    assert link.next() == first  # the other cohort did not hold it back
    second = sorted(scheduler.cohorts[1].members)
    for s in second:
        scheduler.send(s, link, step(s))
    assert link.next() == second
    members[0].__exit__(None, None, None)
    scheduler.set_cohorts(1)  # a new plan: the three left share one cohort
    assert [len(c.members) for c in scheduler.cohorts] == [3]
    for m in members[1:]:
        m.__exit__(None, None, None)
    assert not scheduler.cohorts[0].members


def test_steps_for_two_first_stage_links_go_to_each(scheduler):
    a, b = RecordingLink(), RecordingLink()
    with scheduler.member("x"), scheduler.member("y"):
        scheduler.send("x", a, step("x"))
        scheduler.send("y", b, step("y"))
        assert (a.next(), b.next()) == (["x"], ["y"])


def test_a_session_that_is_no_member_goes_at_once_and_a_broken_link_fails_through(scheduler):
    link = RecordingLink()
    scheduler.send("alone", link, step("alone"))
    assert link.next() == ["alone"]
    broken = RecordingLink(Unavailable("stage 0: the step stream is broken"))
    with pytest.raises(Unavailable):
        scheduler.send("alone", broken, step("alone"))  # no member: the caller sees it
    done = threading.Event()
    scheduler.on_send_failed = lambda request, err: (scheduler.failed.append(str(err)), done.set())
    with scheduler.member("m"):
        scheduler.send("m", broken, step("m"))
        assert done.wait(5)
    assert scheduler.failed == ["stage 0: the step stream is broken"]


def info(device: str) -> pb.StageInfo:
    return pb.StageInfo(device=device)


def test_cohorts_are_the_routes_distinct_devices():
    shared = [(info("cuda:0"), "10.0.0.1:7001"), (info("cuda:0"), "10.0.0.1:7002")]
    assert cohorts_for(shared) == 1  # one GPU: one batch reads the weights once a token
    assert cohorts_for([(info("cuda:0"), "a:1"), (info("cuda:1"), "a:2")]) == 2
    assert cohorts_for([(info("cuda:0"), "a:1"), (info("cuda:0"), "b:1")]) == 2
    assert cohorts_for([(info("cpu"), "a:1"), (info("cpu"), "a:2"), (info("cpu"), "a:3")]) == 3
    assert cohorts_for([]) == 1
