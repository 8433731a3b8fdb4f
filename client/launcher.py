"""The one launcher of local llamadist processes: N stages and an orchestrator on loopback.

Each process is started with port 0 and prints the address it listens on; the launcher reads it
(no port races) and then polls the orchestrator's Health until SERVING (never sleeps blindly).
Used by `llamadist up`, `make run`, the benchmark and the end-to-end tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from client.client import Client

LISTENING = re.compile(r"listening on (\S+:\d+)")
HTTP_API = re.compile(r"OpenAI-compatible API at (\S+)")


class Process:
    """A llamadist service process whose stdout is scanned for its listening address."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        env: dict | None = None,
        prefix: list[str] | None = None,
    ):
        """`prefix` runs the command through another, e.g. ["ip", "netns", "exec", NS] (which
        execs it, so the PID stays the llamadist process's)."""
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "client.cli", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )
        self.address: str | None = None
        self.http_url = ""  # the orchestrator's HTTP API, when it serves one
        self._found = threading.Event()
        threading.Thread(target=self._scan, daemon=True).start()

    def _scan(self) -> None:
        for line in self.proc.stdout:
            text = line.decode(errors="replace")
            api = HTTP_API.search(text)
            if api:  # printed before the gRPC banner
                self.http_url = api.group(1)
            match = LISTENING.search(text)
            if match and self.address is None:
                self.address = match.group(1)
                self._found.set()
        self._found.set()  # the process ended

    def wait_address(self, timeout_s: float) -> str:
        self._found.wait(timeout_s)
        if self.address is None:
            raise RuntimeError(f"{self.name} did not start: {self.tail()}")
        return self.address

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        code = self.proc.poll()
        state = "still running" if code is None else f"exit code {code}"
        return f"{state}; last log lines of {self.log_path}:\n" + "\n".join(text[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class LocalMesh:
    """N stage processes and an orchestrator on loopback; a context manager."""

    def __init__(
        self,
        model: str,
        num_stages: int = 2,
        port: int = 0,
        host: str = "127.0.0.1",
        threads: int | None = None,
        log_dir: Path | None = None,
        extra_stage_args: list[str] | None = None,
        extra_orchestrator_args: list[str] | None = None,
        ready_timeout_s: float = 300.0,
        secure: bool = False,
        tls_cert: str = "",
        tls_key: str = "",
        tls_ca: str = "",
        api_keys_file: str = "",
        stage_key_file: str = "",
        stage_model: str | None = None,
        per_stage_args: list[list[str]] | None = None,
    ):
        """Stages run on `stage_model` (None: `model`; '' with --fetch-weights among their
        args), stage i with `per_stage_args[i]` added. TLS files (all three or none) and an
        API keys file are passed on to the services.
        `secure` makes what is not given: a development CA and certificates in
        `log_dir/tls` and an API keys file `log_dir/api-keys` (its keys in `api_keys`).
        Without TLS the stages and the orchestrator share a stage key, `stage_key_file`
        (made in `log_dir/stage-key` unless given), so that no one else can call the stages."""
        self.model = model
        self.num_stages = num_stages
        self.port = port
        self.host = host
        self.threads = threads or max(1, (os.cpu_count() or 1) // num_stages)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="llamadist-up-"))
        self.extra_stage_args = extra_stage_args or []
        self.stage_model = model if stage_model is None else stage_model
        self.per_stage_args = per_stage_args or [[] for _ in range(num_stages)]
        self.extra_orchestrator_args = extra_orchestrator_args or []
        self.ready_timeout_s = ready_timeout_s
        self.processes: list[Process] = []
        self.address = ""
        self.http_url = ""  # with --http-port among the orchestrator's args
        self.secure = secure
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert, tls_key, tls_ca
        self.api_keys_file = api_keys_file
        self.api_keys: dict[str, str] = {}  # role -> key, when this mesh made the keys file
        self.stage_key_file = stage_key_file

    def _make_credentials(self) -> None:
        from client.certs import make_api_keys, make_certs

        if not (self.tls_cert or self.tls_key or self.tls_ca):
            paths = make_certs(self.log_dir / "tls", hosts=[self.host])
            self.tls_cert = str(paths["server.pem"])
            self.tls_key = str(paths["server-key.pem"])
            self.tls_ca = str(paths["ca.pem"])
        if not self.api_keys_file:
            self.api_keys_file = str(self.log_dir / "api-keys")
            self.api_keys = make_api_keys(self.api_keys_file)

    def _tls_args(self) -> list[str]:
        if not self.tls_ca:
            return []
        return ["--tls-cert", self.tls_cert, "--tls-key", self.tls_key, "--tls-ca", self.tls_ca]

    def _stage_credential(self) -> None:
        """Without TLS, the stage key (made once in the log directory): stages refuse to start
        without a credential."""
        if not self.tls_ca and not self.stage_key_file:
            from protos.shared.stage_auth import make_stage_key

            self.stage_key_file = str(self.log_dir / "stage-key")
            make_stage_key(self.stage_key_file)

    def _stage_key_args(self) -> list[str]:
        return ["--stage-key-file", self.stage_key_file] if self.stage_key_file else []

    def start(self) -> LocalMesh:
        try:
            if self.secure:
                self._make_credentials()
            self._stage_credential()
            stages = [
                self._spawn(
                    f"stage{i}",
                    [
                        "stage",
                        "--model",
                        self.stage_model,
                        "--host",
                        self.host,
                        "--port",
                        "0",
                        "--threads",
                        str(self.threads),
                        *self._tls_args(),
                        *self._stage_key_args(),
                        *self.extra_stage_args,
                        *self.per_stage_args[i],
                    ],
                )
                for i in range(self.num_stages)
            ]
            addresses = [p.wait_address(self.ready_timeout_s) for p in stages]
            orch = self._spawn(
                "orchestrator",
                [
                    "orchestrator",
                    "--model",
                    self.model,
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--stages",
                    ",".join(addresses),
                    *self._tls_args(),
                    *self._stage_key_args(),
                    *(["--api-keys-file", self.api_keys_file] if self.api_keys_file else []),
                    *self.extra_orchestrator_args,
                ],
            )
            self.address = orch.wait_address(self.ready_timeout_s)
            self.http_url = orch.http_url
            with Client(self.address, tls_ca=self.tls_ca or None) as client:  # Health needs no key
                client.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, args: list[str]) -> Process:
        process = Process(name, args, self.log_dir)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
