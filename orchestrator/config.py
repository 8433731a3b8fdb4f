"""The orchestrator process's one frozen config, built from the command line in `client/cli.py`."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.strategies import STRATEGIES
from protos.security import check_tls_flags


@dataclass(frozen=True)
class OrchestratorConfig:
    model: str
    stages: tuple[str, ...]  # host:port of each position in order; '+' joins replicas
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port (printed when listening)
    strategy: str = "uniform"
    max_memory: str = ""  # "4GB" for all stages or "4GB,8GB" one per stage
    boundaries: str = ""  # custom strategy: "0-9,10-29"
    stage_wait_s: float = 300.0  # how long to wait for stages at start
    step_timeout_s: float = 60.0  # deadline of one stage call
    max_workers: int = 64
    max_sessions_per_client: int = 32  # concurrent generations per API key (or peer host)
    grace_s: float = 5.0
    # TLS: the certificate served to clients and presented to the stages (mutual TLS), and the
    # CA that signed the stages' certificates. All empty = plaintext. See protos/security.py.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    api_keys_file: str = ""  # "<key> <role>" lines; empty = no keys needed

    def __post_init__(self) -> None:
        check_tls_flags(self.tls_cert, self.tls_key, self.tls_ca)
        if not self.stages:
            raise ValueError("--stages needs at least one host:port")
        for group in self.stages:
            for address in group.split("+"):  # '+' joins replicas of one position
                host, _, port = address.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"stage address {address!r} is not host:port")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"--strategy must be one of {sorted(STRATEGIES)}, got {self.strategy!r}"
            )
