"""Runs the orchestrator's HTTP API (openai_api.py) with uvicorn on a thread of the
orchestrator process, beside the gRPC server."""

from __future__ import annotations

import threading
import time

import uvicorn


class HttpServer:
    def __init__(self, app, host: str, port: int, tls_cert: str = "", tls_key: str = ""):
        self.tls = bool(tls_cert)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self.port = 0

    def start(self, timeout_s: float = 30.0) -> int:
        """Starts serving; returns the bound port (port 0 picks a free one)."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError("the HTTP API did not start (is its port free?)")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self.port

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
