"""One long-lived ForwardStream per stage link: the steps of many sessions multiplexed on it by
request id, each answered through its own callback (cheaper per step than a unary call).

Steps queued while the stream is busy sending go out together as one StepBatch (the stage runs
them in one forward where they fit and answers with one StepBatchReply), so with many sessions
a stage link carries a few messages per step of the mesh, not one per session.

A broken stream fails every step waiting on it with Unavailable naming the stage; the next step
opens a new one. Deadlines are the caller's (router._Chain): a step it gives up on is forgotten.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from protos import llamadist_pb2 as pb
from protos.errors import InvalidArgument, LlamadistError, Unavailable
from protos.limits import MAX_BATCH_BYTES, split_by_size
from protos.status import ERRORS, from_rpc_error

STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

OnReply = Callable[[pb.StepReply | LlamadistError], None]

# While a reader thread hands out the replies of one batch, the next-hop steps those callbacks
# submit are held here and queued together when it is done, one group per link: the next stage
# then gets them as one StepBatch (one forward) rather than one message for the first of them.
_held = threading.local()
log = logging.getLogger(__name__)


def _call_back(on_reply: OnReply, outcome: pb.StepReply | LlamadistError) -> None:
    try:
        on_reply(outcome)
    except Exception:  # a caller's bug must not stop the replies of the other callers
        log.exception("a step's reply callback failed")


class StepStream:
    def __init__(
        self, open_stream, describe: Callable[[], str], max_batch_bytes: int = MAX_BATCH_BYTES
    ):
        self.describe = describe  # the link's current name, "stage i (host:port)"
        self.max_batch_bytes = max_batch_bytes
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, OnReply] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.broken = False
        self._call = open_stream(self._batches())
        threading.Thread(target=self._read, name="step-replies", daemon=True).start()

    def _batches(self) -> Iterator[pb.StepBatch]:
        """What grpc sends: every request queued by now, as few messages as fit under the
        message limit (None ends the stream). The queue holds requests and lists of requests
        (a held group)."""
        get, get_nowait = self._requests.get, self._requests.get_nowait
        steps: list[pb.StepRequest] = []
        item = get()
        while item is not None:
            if isinstance(item, list):
                steps.extend(item)
            else:
                steps.append(item)
            try:
                item = get_nowait()
                continue
            except queue.Empty:
                pass
            for group in split_by_size(steps, self.max_batch_bytes):
                yield pb.StepBatch(steps=group)
            steps = []
            item = get()
        for group in split_by_size(steps, self.max_batch_bytes):
            yield pb.StepBatch(steps=group)

    def _read(self) -> None:
        try:
            for batch in self._call:
                with self._lock:
                    callbacks = [self._pending.pop(r.request_id, None) for r in batch.replies]
                _held.groups = {}
                try:
                    for on_reply, reply in zip(callbacks, batch.replies, strict=True):
                        if on_reply is not None:
                            _call_back(on_reply, self._outcome(reply))
                finally:
                    groups, _held.groups = _held.groups, None
                    for stream, requests in groups.items():
                        stream._requests.put(requests)
            error: LlamadistError = Unavailable(f"{self.describe()} closed the step stream")
        except grpc.RpcError as err:
            error = from_rpc_error(err, self.describe())
        with self._lock:
            self.broken = True
            pending, self._pending = self._pending, {}
        for on_reply in pending.values():
            _call_back(on_reply, error)

    def _outcome(self, reply: pb.StepReply) -> pb.StepReply | LlamadistError:
        if not reply.error_code:
            return reply
        code = STATUS_BY_NUMBER.get(reply.error_code, grpc.StatusCode.UNKNOWN)
        return ERRORS.get(code, LlamadistError)(f"{self.describe()}: {reply.error_message}")

    def submit(self, request: pb.StepRequest, on_reply: OnReply) -> int:
        """Queues a step; `on_reply(reply or error)` runs once, on this link's reader thread
        (keep it short: it delays the other replies of its batch). Returns the request id."""
        size = request.ByteSize()
        if size > self.max_batch_bytes:
            raise InvalidArgument(
                f"a step of {len(request.token_ids)} tokens is {size:,} bytes, over the "
                f"{self.max_batch_bytes:,}-byte limit of one message: send fewer tokens per step"
            )
        with self._lock:
            if self.broken:
                raise Unavailable(f"{self.describe()}: the step stream is broken")
            request.request_id = next(self._ids)
            self._pending[request.request_id] = on_reply
        groups = getattr(_held, "groups", None)
        if groups is None:
            self._requests.put(request)
        else:
            groups.setdefault(self, []).append(request)
        return request.request_id

    def forget(self, request_id: int) -> None:
        """Drops a step's callback (its caller gave up waiting)."""
        with self._lock:
            self._pending.pop(request_id, None)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
