"""The hop socket (protos/shared/hop.py, stage_service/hop_server.py): step links on a socket of
our own instead of a ForwardStream. Real stage servers on loopback; the mesh's tokens are
transformers' whatever each side's --hop, and a socket caller gets the gRPC service's refusals
(stage key, mutual TLS) and precise errors for what is not the hop protocol."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time

import grpc
import pytest

from orchestrator.config import OrchestratorConfig
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import InvalidArgument, Unauthenticated, Unavailable
from protos.shared import hop_wire
from protos.shared.hop import HopCall, HopDialer, tls_client_context
from protos.shared.hop_wire import END, HEADER, MESSAGE, Conn, Gone
from protos.shared.stage_auth import load_stage_key
from tests.conftest import (
    in_process_mesh,
    keyed_channel,
    reference_greedy,
    stage_key_file,
)
from tests.secure_mesh import SecureMesh, tls

PROMPTS = [[5, 6, 7], [9, 3, 1, 4, 4], [2], [11, 12, 13, 14]]
NEW_TOKENS = 12


def generate_all(mesh) -> list[list[int]]:
    """PROMPTS decoded at once (the scheduler batches them)."""
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = mesh.client.generate(token_ids=PROMPTS[i], max_new_tokens=NEW_TOKENS).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(PROMPTS))]


def link_calls(mesh) -> list[object]:
    """The stream call under the orchestrator's link to each stage it has one to."""
    stages = mesh.orchestrator.router.stages
    return [s._link._call for s in stages if s._link is not None]


def hop_conns(mesh) -> list[int]:
    return [len(server.hop._conns) if server.hop else 0 for server in mesh.stage_servers]


def stub(address: str) -> pb_grpc.StageStub:
    return pb_grpc.StageStub(keyed_channel(address))


@pytest.mark.parametrize("stage_hop", ["socket", "grpc"])
@pytest.mark.parametrize("orchestrator_hop", ["socket", "grpc"])
def test_tokens_are_transformers_whatever_each_side_links_by(tiny, stage_hop, orchestrator_hop):
    """Stages that forward to each other (stage 0 -> 1 -> 2) and an orchestrator, each side
    with its own --hop: a socket link where both sides have one, gRPC otherwise."""
    expected = [reference_greedy(tiny, p, NEW_TOKENS) for p in PROMPTS]
    with in_process_mesh(tiny, 3, stage_options=dict(hop=stage_hop), hop=orchestrator_hop) as mesh:
        assert generate_all(mesh) == expected
        infos = [stub(a).Info(pb.InfoRequest()) for a in mesh.addresses]
        calls = link_calls(mesh)
        conns = hop_conns(mesh)
    assert all(bool(i.hop_port) == (stage_hop == "socket") for i in infos)
    both = stage_hop == orchestrator_hop == "socket"
    assert calls and all(isinstance(c, HopCall) == both for c in calls)
    if stage_hop == "socket":
        # the orchestrator's links (where it links by socket) and stage i's link to stage i+1
        assert conns[1] >= 1 and conns[2] >= 1
        assert conns[0] == (1 if both else 0)
    else:
        assert conns == [0, 0, 0]


def test_a_stage_refuses_a_socket_caller_without_its_key(tiny):
    with in_process_mesh(tiny, 2) as mesh:
        address = mesh.addresses[0]
        info = stub(address).Info(pb.InfoRequest())
        for key in (None, "not-the-key"):
            with pytest.raises(Unauthenticated, match="stage key"):
                HopDialer("socket", key=key).connect(address, info, "test hop")
        conn = HopDialer("socket", key=load_stage_key(stage_key_file())).connect(
            address, info, "test hop"
        )
        conn.close()
        assert mesh.client.generate(token_ids=[5, 6], max_new_tokens=3).token_ids == (
            reference_greedy(tiny, [5, 6], 3)
        )


def test_a_socket_that_is_not_the_stage_of_its_info_is_refused(tiny):
    with in_process_mesh(tiny, 1) as mesh:
        address = mesh.addresses[0]
        info = stub(address).Info(pb.InfoRequest())
        info.instance = "another process"
        dialer = HopDialer("socket", key=load_stage_key(stage_key_file()))
        with pytest.raises(Unavailable, match="not the stage that answered Info"):
            dialer.connect(address, info, "test hop")


def test_bytes_that_are_not_the_hop_protocol_get_invalid_argument_and_harm_nothing(tiny):
    """Garbage before the hello, and a frame of an unknown kind after it: the stage answers
    INVALID_ARGUMENT on that connection only, and the mesh keeps serving."""
    with in_process_mesh(tiny, 2) as mesh:
        address = mesh.addresses[0]
        info = stub(address).Info(pb.InfoRequest())
        before = mesh.client.generate(token_ids=[4, 2], max_new_tokens=4).token_ids
        with socket.create_connection(("127.0.0.1", info.hop_port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: stage\r\n\r\n")
            conn = Conn(raw, "raw")
            kind, payload = conn.recv()
        assert kind == END
        end = pb.HopEnd.FromString(payload)
        assert end.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "not a hop frame" in end.message
        dialer = HopDialer("socket", key=load_stage_key(stage_key_file()))
        conn = dialer.connect(address, info, "test hop")
        conn.send(MESSAGE, b"\xff\xfe not a StepBatch")
        with pytest.raises(InvalidArgument, match="not a StepBatch"):
            list(HopCall(conn))
        assert mesh.client.generate(token_ids=[4, 2], max_new_tokens=4).token_ids == before
        assert before == reference_greedy(tiny, [4, 2], 4)


def test_a_frame_over_the_message_limit_is_refused_before_it_is_read():
    left, right = socket.socketpair()
    try:
        left.sendall(HEADER.pack(1 << 31, MESSAGE))
        with pytest.raises(InvalidArgument, match="not a hop frame"):
            Conn(right, "pair").recv()
    finally:
        left.close()
        right.close()


def test_a_silent_peer_is_gone_within_the_keepalive_window():
    """A peer whose kernel still holds the connection open but that sends nothing (a frozen
    process): the reader gives up after DEAD_S, as gRPC's keepalive does."""
    left, right = socket.socketpair()
    conn = Conn(right, "silent peer")
    conn.heartbeat_mode()
    start = time.monotonic()
    try:
        with pytest.raises(Gone, match="said nothing"):
            conn.recv()
        waited = time.monotonic() - start
        assert hop_wire.DEAD_S <= waited < hop_wire.DEAD_S + 4 * hop_wire.BEAT_S
        # and it pinged the silent side meanwhile: a frozen peer, not a quiet one
        left.setblocking(False)
        data = left.recv(1 << 16)
        assert data[: HEADER.size] == HEADER.pack(0, hop_wire.PING)
    finally:
        conn.close()
        left.close()


def test_a_big_message_to_a_slow_reader_waits_for_it_rather_than_failing():
    """A send that fills the socket's buffers blocks until the peer reads (a big prefill on a
    slow link takes seconds), however long past BEAT_S that is."""
    left, right = socket.socketpair()
    sender, receiver = Conn(left, "sender"), Conn(right, "receiver")
    for conn in (sender, receiver):
        conn.heartbeat_mode()
    payload = bytes(range(256)) * (64 << 10)  # 16 MiB, far over a socketpair's buffer
    errors: list[Exception] = []

    def send() -> None:
        try:
            sender.send(MESSAGE, payload)
        except Gone as err:
            errors.append(err)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    time.sleep(3 * hop_wire.BEAT_S)  # the reader is busy elsewhere
    assert thread.is_alive()  # still sending
    try:
        assert receiver.recv() == (MESSAGE, payload)
        thread.join(5)
        assert not thread.is_alive() and errors == []
    finally:
        sender.close()
        receiver.close()


def test_a_reader_knows_whether_the_peers_next_message_is_already_in():
    """Conn.pending: what lets a stage run a small batch on its reader thread only when no
    message waits behind it (Batcher.submit_many's inline)."""
    left, right = socket.socketpair()
    sender, receiver = Conn(left, "sender"), Conn(right, "receiver")
    receiver.heartbeat_mode()
    try:
        assert not receiver.pending()
        sender.send(MESSAGE, b"one")
        sender.send(MESSAGE, b"two")
        assert receiver.recv() == (MESSAGE, b"one")
        assert receiver.pending()  # "two" came in with it, or waits in the socket
        assert receiver.recv() == (MESSAGE, b"two")
        assert not receiver.pending()
    finally:
        sender.close()
        receiver.close()


def test_a_connection_refusing_sends_sends_nothing_more():
    """What a stopping stage does to every connection before it closes any (so that a step cut
    off by one close is not answered on another)."""
    left, right = socket.socketpair()
    conn = Conn(left, "stopping")
    try:
        conn.refuse_sends()
        with pytest.raises(Gone, match="closing"):
            conn.send(MESSAGE, b"an answer")
        right.setblocking(False)
        with pytest.raises(BlockingIOError):
            right.recv(16)  # nothing went out
    finally:
        conn.close()
        right.close()


def test_a_stall_of_this_process_is_not_taken_for_a_silent_peer():
    """A thread that holds the GIL for 3 s stops this process's heartbeat and its readers
    alike: when it lets go, the link is still up (the peer was not silent, we were)."""
    left, right = socket.socketpair()
    ends = [Conn(left, "left"), Conn(right, "right")]
    errors: list[Exception] = []

    def read(conn: Conn) -> None:
        try:
            conn.recv()
        except Gone as err:
            errors.append(err)

    for conn in ends:
        conn.heartbeat_mode()
    readers = [threading.Thread(target=read, args=(c,), daemon=True) for c in ends]
    for reader in readers:
        reader.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)  # this thread keeps the GIL while it runs Python
    try:
        until = time.monotonic() + hop_wire.DEAD_S + 1.0
        while time.monotonic() < until:
            pass
    finally:
        sys.setswitchinterval(interval)
    time.sleep(2 * hop_wire.BEAT_S)
    assert errors == [] and all(r.is_alive() for r in readers)
    ends[0].send(MESSAGE, b"still here")
    readers[1].join(5)
    assert not readers[1].is_alive() and errors == []
    ends[0].close()
    readers[0].join(5)
    assert len(errors) == 1 and "closed" in str(errors[0])  # left's own reader, on its close
    ends[1].close()


def test_quiet_links_stay_up_between_steps(tiny):
    """Heartbeats both ways keep an idle link alive past DEAD_S: the next step goes on it."""
    with in_process_mesh(tiny, 2) as mesh:
        first = mesh.client.generate(token_ids=[3, 1], max_new_tokens=3).token_ids
        calls = link_calls(mesh)
        time.sleep(hop_wire.DEAD_S + 1.0)
        again = mesh.client.generate(token_ids=[3, 1], max_new_tokens=3).token_ids
        assert link_calls(mesh) == calls  # the same connections
    assert first == again == reference_greedy(tiny, [3, 1], 3)


def test_a_stage_whose_socket_cannot_be_reached_is_linked_over_grpc(tiny, monkeypatch, caplog):
    """A hop port a firewall or an unpublished container port hides: the link falls back to
    ForwardStream, saying so, and the tokens are the same."""
    real = socket.create_connection

    def refused(address, *args, **kwargs):
        if address[1] in ports:
            raise ConnectionRefusedError("refused (the test's firewall)")
        return real(address, *args, **kwargs)

    with in_process_mesh(tiny, 2, stage_options=dict(hop="socket"), hop="grpc") as mesh:
        ports = {server.hop.port for server in mesh.stage_servers}
        monkeypatch.setattr(socket, "create_connection", refused)
        monkeypatch.setattr("protos.shared.hop.is_loopback", lambda host: False)  # no Unix path
        dialer = HopDialer("socket", key=load_stage_key(stage_key_file()))
        stage = stub(mesh.addresses[0])
        with caplog.at_level(logging.WARNING):
            opener = dialer.opener(mesh.addresses[0], stage, "stage 0")
        assert opener is stage.ForwardStream
        assert "linking over gRPC" in caplog.text and "cannot connect" in caplog.text


# ---------------------------------------------------------------------- mutual TLS


def test_mtls_mesh_links_by_socket_and_generates_exactly(tiny, pki):
    m = SecureMesh(tiny, [tls(pki.good)] * 2, tls(pki.good), stage_wait_s=30)
    try:
        with m_client(m, pki) as c:
            out = c.generate(token_ids=[5, 6, 7], max_new_tokens=6)
        calls = [s._link._call for s in m.orchestrator.router.stages if s._link is not None]
        hops = [server.hop for server in m.servers[:2]]
        assert out.token_ids == reference_greedy(tiny, [5, 6, 7], 6)
        assert calls and all(isinstance(c, HopCall) for c in calls)
        assert all(hop.tls is not None and hop._conns for hop in hops)
    finally:
        m.stop()


def test_a_tls_stage_refuses_socket_callers_without_a_certificate_of_its_ca(tiny, pki):
    m = SecureMesh(tiny, [tls(pki.good)], tls(pki.good), stage_wait_s=30)
    try:
        address = m.addresses[0]
        creds = _grpc_creds(pki.good)
        info = pb_grpc.StageStub(grpc.secure_channel(address, creds)).Info(pb.InfoRequest())
        good = pki.good
        callers = {
            "plaintext": None,
            "no client certificate": _trusting(good),
            "certificate of another CA": tls_client_context(
                str(good["ca.pem"]), str(pki.rogue["server.pem"]), str(pki.rogue["server-key.pem"])
            ),
        }
        for name, context in callers.items():
            dialer = HopDialer("socket", tls=context)
            with pytest.raises(Unavailable):
                dialer.connect(address, info, f"{name} hop").recv()
        dialer = HopDialer("socket", tls=tls_client_context(*_pem(good)))
        dialer.connect(address, info, "good hop").close()
        with m_client(m, pki) as c:
            assert c.generate(token_ids=[8, 1], max_new_tokens=3).token_ids == (
                reference_greedy(tiny, [8, 1], 3)
            )
    finally:
        m.stop()


def m_client(m: SecureMesh, pki):
    from client.client import Client

    return Client(m.address, 30, tls_ca=pki.good["ca.pem"])


def _pem(paths) -> tuple[str, str, str]:
    return str(paths["ca.pem"]), str(paths["server.pem"]), str(paths["server-key.pem"])


def _grpc_creds(paths) -> grpc.ChannelCredentials:
    from protos.shared.security import channel_credentials

    return channel_credentials(*_pem(paths))


def _trusting(paths):
    import ssl

    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(paths["ca.pem"]))


def test_the_hop_flags_are_on_both_services(tiny):
    assert OrchestratorConfig(model=str(tiny), stages=("a:1",)).hop in ("socket", "grpc")
    with pytest.raises(ValueError, match="--hop"):
        OrchestratorConfig(model=str(tiny), stages=("a:1",), hop="udp")
