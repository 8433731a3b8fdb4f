"""The hop socket: a step link's messages (StepBatch out, StepBatchReply back: the ForwardStream's)
on one persistent connection instead of a gRPC stream. grpcio costs ~0.8 ms of Python-side
thread hand-offs a message; a socket read by one thread of our own costs what the kernel does.

How a link is made (`HopDialer.opener`): the caller asks the stage's gRPC service for its
StageInfo, which advertises the socket (hop_port, and hop_unix_path for callers on its host);
it connects (the Unix socket when the stage's address is a loopback one, else TCP to the
stage's host), shakes hands with TLS when TLS is on (the gRPC service's certificates: mutual
TLS, the stage's name checked as gRPC checks it), and sends a HopHello with the stage key. The
stage answers with its instance, which must be the one Info gave (a Unix path left by another
process is not it). Then the link runs as on ForwardStream: the same messages, the same
origin declarations, the same answers. A stage without a hop socket (--hop grpc) is linked
over ForwardStream, and so is every stage when the caller's --hop is grpc.

Frames, heartbeats and TLS: protos/shared/hop_wire.py. The stage's end:
stage_service/hop_server.py.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from protos import llamadist_pb2 as pb
from protos.errors import InvalidArgument, LlamadistError, Unavailable
from protos.shared.hop_wire import CONNECT_S, END, HELLO, MESSAGE, Conn
from protos.status import ERRORS, from_rpc_error

log = logging.getLogger(__name__)
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def end_frame(code: grpc.StatusCode, message: str) -> bytes:
    return pb.HopEnd(code=code.value[0], message=message).SerializeToString()


def _ended(payload: bytes, name: str) -> LlamadistError | None:
    """The error a HopEnd frame carries (None: a clean end)."""
    end = pb.HopEnd.FromString(payload)
    if not end.code:
        return None
    code = STATUS_BY_NUMBER.get(end.code, grpc.StatusCode.UNKNOWN)
    return ERRORS.get(code, LlamadistError)(f"{name}: {end.message}")


class Unreachable(Unavailable):
    """The stage's hop socket cannot be connected to (its gRPC port can)."""


class HopCall:
    """What StepLink needs of a stream call: iterating gives the replies (a LlamadistError when
    the stream fails), cancel() ends it. Unlike a gRPC stream it is written directly: `write`
    sends a StepBatch on the caller's thread (StepLink takes it for that), with no writer thread
    to hand each message to."""

    def __init__(self, conn: Conn):
        self._conn = conn

    def write(self, batch: pb.StepBatch) -> None:
        """Gone (Unavailable) when the connection is down."""
        self._conn.send(MESSAGE, batch.SerializeToString())

    def __iter__(self) -> Iterator[pb.StepBatchReply]:
        try:
            while True:
                kind, payload = self._conn.recv()
                if kind == MESSAGE:
                    yield pb.StepBatchReply.FromString(payload)
                elif kind == END:
                    error = _ended(payload, self._conn.name)
                    if error is not None:
                        raise error
                    return
                else:
                    raise InvalidArgument(f"{self._conn.name}: an unexpected frame (kind {kind})")
        except DecodeError:
            raise InvalidArgument(f"{self._conn.name}: a frame is not a StepBatchReply") from None
        finally:
            self._conn.close()

    def cancel(self) -> None:
        self._conn.close()


# ---------------------------------------------------------------------- dialing


def tls_client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """Toward stages: trusts `ca`, presents cert/key, checks the stage's name."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    return context


def tls_server_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """A stage's: presents cert/key, requires a client certificate that `ca` signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HopDialer:
    """How a process opens its step links: `mode` socket (the hop socket where the stage has
    one) or grpc (ForwardStream always); `tls`: tls_client_context (None = plaintext); `key`:
    the stage key (None = none)."""

    mode: str = "grpc"
    tls: ssl.SSLContext | None = None
    key: str | None = None

    @classmethod
    def from_flags(
        cls, mode: str, tls_ca: str, tls_cert: str, tls_key: str, stage_key: str | None
    ) -> HopDialer:
        """A service's dialer from its --hop and --tls-* flags and its stage key."""
        tls = tls_client_context(tls_ca, tls_cert, tls_key) if tls_ca else None
        return cls(mode, tls, stage_key)

    def opener(self, address: str, stub, name: str) -> Callable:
        """What StepLink opens its stream with: the hop socket when the stage has one and this
        dialer's mode is socket, else `stub.ForwardStream`. Unavailable when the stage cannot
        be asked or reached; UNAUTHENTICATED when it refuses this caller."""
        if self.mode != "socket":
            return stub.ForwardStream
        try:
            info = stub.Info(pb.InfoRequest(), timeout=CONNECT_S)
        except grpc.RpcError as err:
            raise from_rpc_error(err, name) from None
        except ValueError as err:  # a closed channel
            raise Unavailable(f"{name}: {err}") from None
        if not info.hop_port:
            return stub.ForwardStream
        try:
            conn = self.connect(address, info, f"{name} hop")
        except Unreachable as err:  # a port not published, a firewall: gRPC still reaches it
            log.warning("%s; linking over gRPC (ForwardStream) instead", err)
            return stub.ForwardStream
        return lambda batches: HopCall(conn)  # written directly, not from `batches`

    def connect(self, address: str, info: pb.StageInfo, name: str) -> Conn:
        host, _ = split_address(address)
        unix = info.hop_unix_path
        if unix and is_loopback(host) and Path(unix).exists():
            try:
                return self._hello(_unix_socket(unix), name, host, info.instance)
            except (OSError, ssl.SSLError, Unavailable):
                pass  # another host's path, or another process's: TCP says
        try:
            sock = socket.create_connection((host, info.hop_port), timeout=CONNECT_S)
        except OSError as err:
            raise Unreachable(
                f"{name}: cannot connect to {host}:{info.hop_port}, the hop socket the stage "
                f"advertises: {err}"
            ) from None
        try:
            return self._hello(sock, name, host, info.instance)
        except ssl.SSLError as err:
            raise Unavailable(f"{name}: TLS refused: {err}") from None
        except OSError as err:
            raise Unavailable(f"{name}: {err}") from None

    def _hello(self, sock: socket.socket, name: str, host: str, instance: str) -> Conn:
        conn = Conn(sock, name)
        try:
            if self.tls is not None:
                conn.start_tls(self.tls, server_side=False, hostname=host)
            conn.heartbeat_mode()
            conn.send(HELLO, pb.HopHello(stage_key=self.key or "").SerializeToString())
            kind, payload = conn.recv()
            if kind == END:
                raise _ended(payload, name) or Unavailable(f"{name}: the stage ended the link")
            if kind != HELLO or pb.HopHello.FromString(payload).instance != instance:
                raise Unavailable(f"{name}: the socket is not the stage that answered Info")
            return conn
        except BaseException:
            conn.close()
            raise


def _unix_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_S)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock
