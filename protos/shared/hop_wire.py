"""Frames on one connection of the hop socket (protos/shared/hop.py): TCP or a Unix socket,
plain or TLS, with heartbeats.

A frame is a 5-byte header, the payload's length (uint32, little-endian) and its kind, then the
payload: a serialized protobuf message. Either side sends a PING after BEAT_S without sending
anything (one heartbeat thread per process sends them, whatever its readers are doing), and its
reader takes a peer it has heard nothing from for DEAD_S as gone: a frozen process (SIGSTOP, a
stalled VM) whose kernel still acks TCP, a cut link, a powered-off host. That is the gRPC
link's keepalive window (protos/shared/serving.py, ~2 s). The silence is counted in the reader's
own waits of BEAT_S that found nothing (QUIET_WAITS of them, and DEAD_S of wall time), so that a
stall of this process (a thread holding the GIL for seconds stops its heartbeat and its reader
alike) is not taken for the peer's. A peer process stalled that long is taken as gone: unlike
grpcio's C threads, its heartbeat needs the GIL.

TLS runs through memory BIOs (ssl.SSLObject), not ssl.SSLSocket: one thread reads while others
write, and an OpenSSL connection must not be used by two threads at once. `_lock` guards the
SSL object; `_send_lock` keeps frames whole and in order on the wire (taken first).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
import weakref

from protos.errors import InvalidArgument, Unavailable
from protos.limits import MAX_MESSAGE_BYTES

HEADER = struct.Struct("<IB")
HELLO, MESSAGE, END, PING = 1, 2, 3, 4
KINDS = (HELLO, MESSAGE, END, PING)
BEAT_S = 0.5
DEAD_S = 2.0
QUIET_WAITS = round(DEAD_S / BEAT_S)
CONNECT_S = 5.0  # to connect and shake hands
READ_BYTES = 1 << 20


class Gone(Unavailable):
    """The connection ended: closed, cut, or silent past DEAD_S."""


class _Heart:
    """The process's heartbeat: a PING on every open connection that sent nothing for BEAT_S
    (skipped where a send is under way: that one says enough)."""

    def __init__(self):
        self._conns: weakref.WeakSet[Conn] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, conn: Conn) -> None:
        with self._lock:
            self._conns.add(conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="hop-heart", daemon=True)
                self._thread.start()

    def _beat(self) -> None:
        while True:
            time.sleep(BEAT_S / 2)
            with self._lock:
                conns = list(self._conns)
            now = time.monotonic()
            for conn in conns:
                if not conn.closed and now - conn.sent_at >= BEAT_S:
                    conn.ping()


HEART = _Heart()


class Conn:
    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.name = name  # for errors: "stage 1 (host:port) hop"
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._buffer = bytearray()  # received plaintext not yet made into frames
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.sent_at = self._heard_at = time.monotonic()
        self._quiet = 0  # the reader's waits of BEAT_S since it last heard the peer
        self._poll: select.poll | None = None  # the reader's, after the handshake
        self._refusing = False  # refuse_sends(): nothing more goes out
        self.closed = False
        sock.settimeout(CONNECT_S)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ---------------------------------------------------------------- TLS

    def start_tls(self, context: ssl.SSLContext, server_side: bool, hostname: str | None) -> None:
        """Shakes hands (the caller's thread, before any frame); an ssl.SSLError if the peer's
        certificate is refused, or it refuses ours."""
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=hostname
        )
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush_tls()
                data = self.sock.recv(READ_BYTES)
                if not data:
                    raise Gone(f"{self.name}: the peer closed the connection during TLS") from None
                self._incoming.write(data)
        self._flush_tls()

    def _flush_tls(self) -> None:
        data = self._outgoing.read()
        if data:
            self.sock.sendall(data)

    def peer_certificate(self) -> dict | None:
        return self._tls.getpeercert() if self._tls is not None else None

    # ---------------------------------------------------------------- sending

    def send(self, kind: int, payload: bytes = b"") -> None:
        """One frame; Gone when the connection is down or sends are refused."""
        frame = HEADER.pack(len(payload), kind) + payload
        try:
            with self._send_lock:
                if self._refusing:
                    raise Gone(f"{self.name}: the connection is closing")
                if self._tls is not None:
                    with self._lock:
                        self._tls.write(frame)
                        frame = self._outgoing.read()
                self.sock.sendall(frame)
                self.sent_at = time.monotonic()
        except (OSError, ssl.SSLError, ValueError) as err:
            self.close()
            raise Gone(f"{self.name}: the connection broke: {err}") from None

    # ---------------------------------------------------------------- receiving

    def ping(self) -> None:
        """A PING unless a send is under way (the heartbeat's)."""
        if not self._send_lock.acquire(blocking=False):
            return
        self._send_lock.release()
        with contextlib.suppress(Gone):  # the reader says so
            self.send(PING)

    def heartbeat_mode(self) -> None:
        """After the handshake: pinged by the heartbeat, and the reader waits BEAT_S at a time
        (poll) to see whether the peer went silent. Sends block as long as the peer reads: a
        big message on a slow link is not a silent peer; one that is gone is found by the
        reader, whose close() fails the send."""
        self.sock.settimeout(None)
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)
        HEART.add(self)

    def recv(self) -> tuple[int, bytes]:
        """The next frame that is not a PING (one thread reads). Sends a PING when idle; Gone
        when the peer closed, the link broke, or nothing came for DEAD_S."""
        while True:
            frame = self._frame()
            if frame is None:
                self._fill()
            elif frame[0] != PING:
                return frame

    def pending(self) -> bool:
        """Bytes of the peer's are here or on their way in (the reading thread's question)."""
        if self._buffer:
            return True
        if self._poll is None:
            return True  # not in heartbeat mode: cannot tell
        try:
            return bool(self._poll.poll(0))
        except (OSError, ValueError):
            return True

    def _frame(self) -> tuple[int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            return None
        length, kind = HEADER.unpack_from(buffer)
        if kind not in KINDS or length > MAX_MESSAGE_BYTES:  # the caller answers and closes
            raise InvalidArgument(
                f"{self.name}: not a hop frame (kind {kind}, {length:,} bytes): the peer does "
                "not speak the hop protocol"
            )
        end = HEADER.size + length
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view:
            payload = bytes(view[HEADER.size : end])
        del buffer[:end]
        return kind, payload

    def _fill(self) -> None:
        if self._poll is not None and not self._poll.poll(BEAT_S * 1000):  # nothing in BEAT_S
            self._quiet += 1
            if self._quiet >= QUIET_WAITS and time.monotonic() - self._heard_at >= DEAD_S:
                self.close()
                raise Gone(f"{self.name}: the peer said nothing for {DEAD_S:.0f} s")
            return
        try:
            data = self.sock.recv(READ_BYTES)
        except TimeoutError:  # in the handshake
            self.close()
            raise Gone(f"{self.name}: no answer within {CONNECT_S:.0f} s") from None
        except (OSError, ValueError) as err:
            if self.closed:
                raise Gone(f"{self.name}: the connection was closed") from None
            self.close()
            raise Gone(f"{self.name}: the connection broke: {err}") from None
        if not data:
            self.close()
            raise Gone(f"{self.name}: the peer closed the connection")
        self._heard_at, self._quiet = time.monotonic(), 0
        if self._tls is None:
            self._buffer += data
            return
        with self._lock:
            self._incoming.write(data)
            try:
                while True:
                    self._buffer += self._tls.read(READ_BYTES)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLError) as err:
                self.close()
                raise Gone(f"{self.name}: TLS ended: {err}") from None
            pending = self._outgoing.pending > 0  # post-handshake messages (session tickets)
        if pending:
            with self._send_lock:
                with self._lock:
                    data = self._outgoing.read()
                with contextlib.suppress(OSError):  # the next read finds the break
                    self.sock.sendall(data)

    def refuse_sends(self) -> None:
        """Nothing more is sent (a send under way finishes): a stage that stops closes every
        connection, and an answer must not leave on one while another's closing fails it."""
        self._refusing = True  # not under the send lock: a send stuck on a peer holds it

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
