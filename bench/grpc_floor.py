"""The transport's floor under the per-hop target: an echo of 2.3 KB (a SmolLM2 hidden state)
between two processes on loopback, over a bare gRPC bidi stream and over the hop socket's frames
(protos/shared/hop_wire.py; TCP and Unix), with no other llamadist code. Both callers hand
each message to a writer thread through a queue and read the answer on their own thread, as a
StepLink does. Round trips back to back, and after the client has been busy for 20 ms (as the
orchestrator waits while a stage computes, so the server side idles).
Usage: python -m bench.grpc_floor"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc

from protos.shared.hop_wire import MESSAGE, Conn, Gone

METHOD = "/floor.Echo/Stream"
PAYLOAD = b"x" * 2304
ROUNDS = 150


def serve_grpc() -> None:
    def echo(requests, context):
        yield from requests

    handler = grpc.method_handlers_generic_handler(
        "floor.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()


def serve_hop(unix_path: str) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen()

    def accept(listener: socket.socket) -> None:
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=echo, args=(Conn(sock, "echo"),), daemon=True).start()

    def echo(conn: Conn) -> None:
        conn.heartbeat_mode()
        with contextlib.suppress(Gone):  # the caller is done
            while True:
                _, payload = conn.recv()
                conn.send(MESSAGE, payload)

    threading.Thread(target=accept, args=(unix,), daemon=True).start()
    print(tcp.getsockname()[1], flush=True)
    accept(tcp)


def timed(send, receive) -> dict[int, float]:
    """Median round trip (µs) after 0 and 20 ms busy."""
    medians = {}
    for gap_ms in (0, 20):
        times = []
        for _ in range(ROUNDS):
            busy_until = time.perf_counter() + gap_ms / 1e3
            while time.perf_counter() < busy_until:
                pass
            t0 = time.perf_counter_ns()
            send(PAYLOAD)
            receive()
            times.append(time.perf_counter_ns() - t0)
        medians[gap_ms] = statistics.median(times[10:]) / 1e3
    return medians


def grpc_echo(port: int) -> dict[int, float]:
    requests: queue.SimpleQueue = queue.SimpleQueue()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    replies = channel.stream_stream(METHOD)(iter(requests.get, None))
    try:
        return timed(requests.put, lambda: next(replies))
    finally:
        requests.put(None)
        channel.close()


def hop_echo(sock: socket.socket) -> dict[int, float]:
    conn = Conn(sock, "floor")
    conn.heartbeat_mode()
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def write() -> None:
        for payload in iter(outbox.get, None):
            conn.send(MESSAGE, payload)

    threading.Thread(target=write, daemon=True).start()
    try:
        return timed(outbox.put, conn.recv)
    finally:
        outbox.put(None)
        conn.close()


def unix_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def main() -> None:
    unix_path = os.path.join(tempfile.mkdtemp(), "floor.sock")
    here = [sys.executable, "-m", "bench.grpc_floor"]
    servers = [
        subprocess.Popen([*here, "serve-grpc"], stdout=subprocess.PIPE, text=True),
        subprocess.Popen([*here, "serve-hop", unix_path], stdout=subprocess.PIPE, text=True),
    ]
    try:
        grpc_port, hop_port = (int(s.stdout.readline()) for s in servers)
        results = {
            "grpcio bidi stream": grpc_echo(grpc_port),
            "hop socket, TCP": hop_echo(socket.create_connection(("127.0.0.1", hop_port))),
            "hop socket, Unix": hop_echo(unix_socket(unix_path)),
        }
        print(f"{'round trip, median µs':<24} {'back to back':>13} {'after 20 ms busy':>17}")
        for name, medians in results.items():
            print(f"{name:<24} {medians[0]:>13.0f} {medians[20]:>17.0f}")
    finally:
        for server in servers:
            server.kill()
        os.unlink(unix_path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve-grpc"]:
        serve_grpc()
    elif sys.argv[1:2] == ["serve-hop"]:
        serve_hop(sys.argv[2])
    else:
        main()
