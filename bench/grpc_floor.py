"""The transport's floor under issue 6's per-hop target: a bare gRPC bidi-stream echo of 2.3 KB
(a SmolLM2 hidden state), no llamadist code, between two processes on loopback. Round trips
back to back, and after the client has been busy for 20 ms (as the orchestrator waits while a
stage computes, so the server side idles). Usage: python bench/grpc_floor.py"""

from __future__ import annotations

import queue
import statistics
import subprocess
import sys
import time
from concurrent import futures

import grpc

METHOD = "/floor.Echo/Stream"
PAYLOAD = b"x" * 2304


def serve() -> None:
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


def main() -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())
        requests: queue.SimpleQueue = queue.SimpleQueue()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        replies = channel.stream_stream(METHOD)(iter(requests.get, None))
        for gap_ms in (0, 20):
            times = []
            for _ in range(150):
                busy_until = time.perf_counter() + gap_ms / 1e3
                while time.perf_counter() < busy_until:
                    pass
                t0 = time.perf_counter_ns()
                requests.put(PAYLOAD)
                next(replies)
                times.append(time.perf_counter_ns() - t0)
            median = statistics.median(times[10:]) / 1e3
            print(f"round trip after {gap_ms:2d} ms busy: median {median:.0f} us")
        requests.put(None)
    finally:
        server.kill()


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["serve"] else main()
