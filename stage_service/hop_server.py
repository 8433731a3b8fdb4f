"""The stage's end of the hop socket (protos/shared/hop.py): a TCP listener on --hop-port and a
Unix socket for callers on this host, each connection served by StepStreams exactly as a
ForwardStream call is. The credential is the gRPC service's: mutual TLS (a client certificate
of --tls-ca) when TLS is on, and the stage key when the stage has one, sent in the caller's
HopHello. A caller refused gets a HopEnd frame UNAUTHENTICATED saying what to send.

`HopServer` lives with the gRPC server (`with_hop`): it accepts once that starts and closes,
with every connection it holds, when that stops."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import ssl
import tempfile
import threading
import uuid
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from protos import llamadist_pb2 as pb
from protos.errors import InvalidArgument, LlamadistError
from protos.shared.hop import end_frame
from protos.shared.hop_wire import END, HELLO, MESSAGE, Conn, Gone
from protos.shared.stage_auth import REFUSAL
from protos.status import code_of
from stage_service.step_streams import StepStreams

log = logging.getLogger(__name__)


class HopServer:
    def __init__(
        self,
        streams: StepStreams,
        host: str,
        port: int = 0,
        key: str | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        self.streams = streams
        self.key = key.encode() if key else None
        self.tls = tls
        self.instance = uuid.uuid4().hex
        self.tcp = socket.create_server((host, port), family=_family(host), backlog=64)
        self.port = self.tcp.getsockname()[1]
        self.unix_path = str(Path(tempfile.gettempdir()) / f"llamadist-hop-{self.instance}.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o600)  # this user's processes only (and TLS or the key)
        self.unix.listen(64)
        self._conns: set[Conn] = set()
        self._lock = threading.Lock()
        self._closed = False

    def info(self) -> dict:
        """The StageInfo fields that advertise it."""
        return dict(hop_port=self.port, hop_unix_path=self.unix_path, instance=self.instance)

    def start(self) -> None:
        for listener in (self.tcp, self.unix):
            threading.Thread(
                target=self._accept, args=(listener,), name="hop-accept", daemon=True
            ).start()

    def close(self) -> None:
        """Stops listening and ends every connection (their callers see the link break)."""
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        for listener in (self.tcp, self.unix):
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.unix_path)
        for conn in conns:  # first: a step cut off by one close is not answered on another
            conn.refuse_sends()
        for conn in conns:
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed
            conn = Conn(sock, "hop caller")
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="hop", daemon=True).start()

    def _serve(self, conn: Conn) -> None:
        try:
            if self._welcome(conn):
                self._stream(conn)
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)

    def _welcome(self, conn: Conn) -> bool:
        """The handshake: TLS (the peer's certificate checked by the context), then the caller's
        HopHello, answered with ours or refused."""
        try:
            if self.tls is not None:
                conn.start_tls(self.tls, server_side=True, hostname=None)
            conn.heartbeat_mode()
            kind, payload = conn.recv()
            if kind != HELLO:
                raise InvalidArgument(f"a hop connection starts with a HopHello, not kind {kind}")
            hello = pb.HopHello.FromString(payload)
            if self.key is not None and not hmac.compare_digest(hello.stage_key.encode(), self.key):
                log.info("refused a hop connection: missing or wrong stage key")
                conn.send(END, end_frame(grpc.StatusCode.UNAUTHENTICATED, REFUSAL))
                return False
            conn.send(HELLO, pb.HopHello(instance=self.instance).SerializeToString())
            return True
        except (ssl.SSLError, OSError, Gone) as err:
            log.info("a hop connection ended in its handshake: %s", err)
        except (InvalidArgument, DecodeError) as err:
            with contextlib.suppress(Gone):
                conn.send(END, end_frame(grpc.StatusCode.INVALID_ARGUMENT, str(err)))
        return False

    def _stream(self, conn: Conn) -> None:
        """As a ForwardStream call: the replies StepStreams gives, then a HopEnd saying why."""

        def write(reply: pb.StepBatchReply) -> None:
            conn.send(MESSAGE, reply.SerializeToString())

        try:
            replies = self.streams.serve(_batches(conn), lambda: conn.closed, write, conn.pending)
            for reply in replies:
                write(reply)  # none: the threads that make the answers write them
            conn.send(END, end_frame(grpc.StatusCode.OK, ""))
        except Gone:
            pass  # the caller went away
        except LlamadistError as err:
            with contextlib.suppress(Gone):
                conn.send(END, end_frame(code_of(err), str(err)))


def _batches(conn: Conn):
    """The caller's StepBatches. Its going away is not an error of the stream (as a cancelled
    ForwardStream): ConnectionResetError, which StepStreams takes as the caller gone."""
    while True:
        try:
            kind, payload = conn.recv()
        except Gone:
            raise ConnectionResetError("the caller went away") from None
        if kind != MESSAGE:
            raise InvalidArgument(f"a hop stream carries StepBatch frames, not kind {kind}")
        try:
            batch = pb.StepBatch.FromString(payload)
        except DecodeError:
            raise InvalidArgument("a hop frame is not a StepBatch") from None
        yield batch


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class ServerWithHop:
    """A stage's gRPC server and its hop server, started and stopped together; anything else
    is the gRPC server's."""

    def __init__(self, server: grpc.Server, hop: HopServer | None):
        self._server = server
        self.hop = hop

    def start(self) -> None:
        self._server.start()
        if self.hop is not None:
            self.hop.start()

    def stop(self, grace):
        if self.hop is not None:
            self.hop.close()
        return self._server.stop(grace)

    def __getattr__(self, name: str):
        return getattr(self._server, name)
