"""What the orchestrator's scheduler loop costs a decode round, with no stage and no socket: N
streams in one cohort, each consumed by a thread of its own as sessions are; each round settles
a StepBatchReply of N answers through the in-flight table (as a link's reader does) until the
cohort's next message is sent. Prints the median per round and per step.

    python -m bench.scheduler_round [--sessions 64] [--rounds 300]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time

from orchestrator.inflight import InFlight
from orchestrator.scheduler import Scheduler, Stream
from protos import llamadist_pb2 as pb


class Link:
    """Takes each message as a real link does (serialized as it is sent)."""

    def __init__(self):
        self.messages: queue.SimpleQueue = queue.SimpleQueue()

    def send(self, steps: list[pb.StepRequest]) -> None:
        self.messages.put([pb.StepRequest.FromString(s.SerializeToString()) for s in steps])


def answers(steps: list[pb.StepRequest]) -> bytes:
    replies = [
        pb.StepReply(request_id=s.request_id, token_id=8, logprob=-0.5, origin="o",
                     route_compute_ns=[1000, 1000], route_batch_sizes=[len(steps)] * 2)
        for s in steps
    ]  # fmt: skip
    return pb.StepBatchReply(replies=replies).SerializeToString()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--rounds", type=int, default=300)
    a = p.parse_args()
    inflight, link = InFlight(), Link()
    scheduler = Scheduler(inflight, lambda: 1, max_wait_s=10.0)
    streams = []
    for i in range(a.sessions):
        name = f"session-{i:04d}"
        template = pb.StepRequest(session_id=name, plan_epoch=1, route=["a", "b"], origin="o")
        template.sampling.temperature = 0
        streams.append(Stream(name, link, template, 5, 7, 10**9, frozenset(), lambda: True))

    def consume(stream: Stream) -> None:
        while stream.answers.get() is not None:
            scheduler.consumed(stream)

    for stream in streams:
        scheduler.open(stream)
        threading.Thread(target=consume, args=(stream,), daemon=True).start()
    message = link.messages.get()
    while len(message) < a.sessions:  # joiners wait for the steps on their way: one cohort
        for reply in pb.StepBatchReply.FromString(answers(message)).replies:
            inflight.complete(reply)
        message = link.messages.get()
    times = []
    for _ in range(a.rounds):
        wire = answers(message)
        t0 = time.perf_counter()
        for reply in pb.StepBatchReply.FromString(wire).replies:
            inflight.complete(reply)
        message = link.messages.get()
        times.append(time.perf_counter() - t0)
    scheduler.close()
    median = statistics.median(times)
    per_step = median * 1e6 / a.sessions
    print(f"{a.sessions} sessions: {median * 1e3:.2f} ms a round, {per_step:.1f} us a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
