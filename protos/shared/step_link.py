"""One long-lived ForwardStream to a stage: the orchestrator's link to each stage it routes
through, and a stage's link to each successor. Used the same way on both sides.

- Sending: `send(steps)` queues steps (`send_batches` messages a stage made, its steps'
  hidden rows packed in each); whatever is queued when the stream is ready to write goes
  out as one StepBatch (under the message limit). This is the link's coalescer: with many
  sessions a link carries a few messages per step of the mesh, not one per session. On the hop
  socket (a call with `write`, protos/shared/hop.py) `send` writes the StepBatch itself, on the
  sender's thread: the senders (the scheduler loop, a stage's compute thread) already send a
  batch at a time, and a hand-off to a writer thread costs a thread wake-up a message.
- Receiving: one reader thread hands every StepReply that arrives to `on_reply`, and when the
  stream ends, says why to `on_broken` once. Whom a reply belongs to is the owner's business.
- With an `origin`, the first message declares the stream that origin's outlet on the stage
  (answers to its steps come back here); `wait_registered` waits for the stage to confirm it.

A broken link stays broken: its owner opens a new one.
"""

from __future__ import annotations

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
log = logging.getLogger(__name__)

OnReply = Callable[[pb.StepReply], None]
OnBroken = Callable[["StepLink", LlamadistError], None]


def reply_error(reply: pb.StepReply, where: str) -> LlamadistError | None:
    """The error a failed reply carries (None when it succeeded), prefixed with `where`."""
    if not reply.error_code:
        return None
    code = STATUS_BY_NUMBER.get(reply.error_code, grpc.StatusCode.UNKNOWN)
    return ERRORS.get(code, LlamadistError)(f"{where}: {reply.error_message}")


class StepLink:
    def __init__(
        self,
        open_stream,
        name: str,
        on_reply: OnReply,
        on_broken: OnBroken | None = None,
        origin: str = "",
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ):
        self.name = name  # "stage i (host:port)": for errors
        self.max_batch_bytes = max_batch_bytes
        self.on_reply = on_reply
        self.on_broken = on_broken
        self.broken = False
        self.registered = threading.Event()  # set by the first reply (origin links)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._call = open_stream(self._batches())
        self._write = getattr(self._call, "write", None)  # the hop socket's: sends write
        self._write_lock = threading.Lock()
        if origin:
            self._put([pb.StepBatch(origin=origin)])
        else:
            self.registered.set()
        threading.Thread(target=self._read, name=f"link {name}", daemon=True).start()

    def send(self, steps: list[pb.StepRequest]) -> None:
        """Queues steps to go out together (with whatever else is queued by then)."""
        self._put_checked(steps, lambda s: f"a step of {len(s.token_ids)} tokens", "tokens")

    def send_batches(self, batches: list[pb.StepBatch]) -> None:
        """Sends messages made by the caller (a stage's steps with their rows packed), each
        under the limit, as they are."""
        self._put_checked(batches, lambda b: f"a message of {len(b.steps)} steps", "steps")

    def _put_checked(self, items: list, what: Callable, fewer: str) -> None:
        """`items` onto the stream, unless one is over the message limit or the link broke."""
        for item in items:
            size = item.ByteSize()
            if size > self.max_batch_bytes:
                raise InvalidArgument(
                    f"{what(item)} is {size:,} bytes, over the {self.max_batch_bytes:,}-byte "
                    f"limit of one message: send fewer {fewer} per message"
                )
        if self.broken:
            raise Unavailable(f"{self.name}: the step stream is broken")
        self._put(items)

    def _put(self, items: list) -> None:
        """Steps (or made messages: the origin declaration, send_batches') onto the stream:
        written now on the hop socket, else queued for grpc's writer."""
        if self._write is None:
            self._outbox.put(items)
            return
        if isinstance(items[0], pb.StepBatch):
            batches = items
        else:
            batches = [pb.StepBatch(steps=g) for g in split_by_size(items, self.max_batch_bytes)]
        try:
            with self._write_lock:
                for batch in batches:
                    self._write(batch)
        except LlamadistError as err:  # the reader sees the break and says so (on_broken)
            self.broken = True
            raise Unavailable(f"{self.name}: the step stream is broken: {err}") from None

    def _batches(self) -> Iterator[pb.StepBatch]:
        """What grpc writes: everything queued by now, in as few messages as fit (None ends)."""
        get, get_nowait = self._outbox.get, self._outbox.get_nowait
        while True:
            item, steps = get(), []
            while item is not None:
                if isinstance(item[0], pb.StepBatch):  # made messages (the origin's first)
                    for group in split_by_size(steps, self.max_batch_bytes):  # in order
                        yield pb.StepBatch(steps=group)
                    steps = []
                    yield from item
                else:
                    steps.extend(item)
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            for group in split_by_size(steps, self.max_batch_bytes):
                yield pb.StepBatch(steps=group)
            if item is None:
                return

    def _read(self) -> None:
        try:
            for batch in self._call:
                self.registered.set()
                for reply in batch.replies:
                    try:
                        self.on_reply(reply)
                    except Exception:  # an owner's bug must not stop the other replies
                        log.exception("handling a reply from %s failed", self.name)
            error: LlamadistError = Unavailable(f"{self.name} closed the step stream")
        except grpc.RpcError as err:
            error = from_rpc_error(err, self.name)
        except LlamadistError as err:  # the hop socket's (its messages name the link)
            error = err
        self.broken = True
        self.registered.set()  # nobody waits for a registration that cannot come
        if self.on_broken is not None:
            self.on_broken(self, error)

    def wait_registered(self, timeout_s: float) -> None:
        """Waits until the stage confirmed the origin declaration; Unavailable if it did not."""
        if not self.registered.wait(timeout_s) or self.broken:
            self.close()
            raise Unavailable(f"{self.name} did not open a step stream within {timeout_s:.0f} s")

    def close(self) -> None:
        self.broken = True
        self._outbox.put(None)
        self._call.cancel()
