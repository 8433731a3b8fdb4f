"""One long-lived ForwardStream per stage link: the steps of many sessions multiplexed on it by
request id, each caller waiting for its own reply (cheaper per step than a unary call).

Steps queued while the stream is busy sending go out together as one StepBatch (the stage runs
them in one forward where they fit and answers with one StepBatchReply), so with many sessions
a stage link carries a few messages per step of the mesh, not one per session.

A broken stream fails every step waiting on it with Unavailable naming the stage; the next step
opens a new one. A step that gets no reply within its deadline fails the same way.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from protos import llamadist_pb2 as pb
from protos.errors import LlamadistError, Unavailable
from protos.status import ERRORS, from_rpc_error

STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class StepStream:
    def __init__(self, open_stream, describe: Callable[[], str]):
        self.describe = describe  # the link's current name, "stage i (host:port)"
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.broken = False
        self._call = open_stream(self._batches())
        threading.Thread(target=self._read, name="step-replies", daemon=True).start()

    def _batches(self) -> Iterator[pb.StepBatch]:
        """What grpc sends: every request queued by now, as one message (None ends the stream)."""
        get, get_nowait = self._requests.get, self._requests.get_nowait
        while (request := get()) is not None:
            steps = [request]
            try:
                while (request := get_nowait()) is not None:
                    steps.append(request)
            except queue.Empty:
                pass
            yield pb.StepBatch(steps=steps)
            if request is None:
                return

    def _read(self) -> None:
        try:
            for batch in self._call:
                with self._lock:
                    futures = [self._pending.pop(r.request_id, None) for r in batch.replies]
                for future, reply in zip(futures, batch.replies, strict=True):
                    if future is not None:
                        future.set_result(reply)
            error: LlamadistError = Unavailable(f"{self.describe()} closed the step stream")
        except grpc.RpcError as err:
            error = from_rpc_error(err, self.describe())
        with self._lock:
            self.broken = True
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(error)

    def step(self, request: pb.StepRequest, timeout_s: float) -> pb.StepReply:
        future: Future = Future()
        with self._lock:
            if self.broken:
                raise Unavailable(f"{self.describe()}: the step stream is broken")
            request.request_id = next(self._ids)
            self._pending[request.request_id] = future
        self._requests.put(request)
        try:
            reply = future.result(timeout_s)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(request.request_id, None)
            raise Unavailable(
                f"{self.describe()} did not answer a step within {timeout_s:.0f} s"
            ) from None
        if reply.error_code:
            code = STATUS_BY_NUMBER.get(reply.error_code, grpc.StatusCode.UNKNOWN)
            cls = ERRORS.get(code, LlamadistError)
            raise cls(f"{self.describe()}: {reply.error_message}")
        return reply

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
