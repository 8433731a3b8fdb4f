"""The replica pool's prober (orchestrator/replicas.py): a replica marked down is always probed
until it is back, whatever moment it is marked down at."""

from __future__ import annotations

import threading
import time

from orchestrator.replicas import ReplicaPool


class FakeStage:
    """Answers Info once `alive` is set."""

    def __init__(self, address: str):
        self.address = address
        self.name = f"stage ({address})"
        self.alive = threading.Event()

    def info(self, timeout_s: float = 1.0):
        if not self.alive.is_set():
            from protos.errors import Unavailable

            raise Unavailable(f"{self.name} is unreachable")
        return None

    def close(self) -> None:
        pass


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_replica_marked_down_while_the_prober_exits_is_still_probed():
    pool = ReplicaPool(FakeStage)
    first, second = pool.replica("a:1"), pool.replica("b:1")
    first.client.alive.set()
    second.client.alive.set()
    real_down = pool.down
    exiting = threading.Event()

    def slow_down():
        found = real_down()
        if not found:  # the prober saw nothing down and is about to exit: hold it there
            exiting.set()
            time.sleep(0.2)
        return found

    pool.down = slow_down
    pool.mark_down(first, "test")
    assert wait_until(lambda: first.up), "the first replica never came back"
    assert exiting.wait(5)
    pool.mark_down(second, "test")  # while the prober is on its way out
    assert wait_until(lambda: second.up), "a replica marked down then was never probed again"
    pool.close()
