"""What the security tests (tests/test_security*.py) share: their API keys, development CAs
(`make_pki`, the `pki` fixture in conftest), a mesh whose services have their own TLS settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from client.certs import make_certs
from orchestrator.config import OrchestratorConfig
from orchestrator.server import build_server as build_orchestrator
from stage_service.config import StageConfig
from stage_service.server import build_server as build_stage

CLIENT_KEY = "client-key-0123456789abcdef"
ADMIN_KEY = "admin-key-fedcba9876543210"


def make_pki(root: Path) -> SimpleNamespace:
    """Two unrelated development CAs: `good` (the mesh's) and `rogue`."""
    keys = root / "api-keys"
    keys.write_text(
        f"# the test mesh's keys\n{CLIENT_KEY} client\n\n{ADMIN_KEY}   admin  # all RPCs\n"
    )
    return SimpleNamespace(
        good=make_certs(root / "good"), rogue=make_certs(root / "rogue"), keys=str(keys)
    )


def tls(paths: dict[str, Path], ca: dict[str, Path] | None = None) -> dict[str, str]:
    """Service TLS settings: the server certificate of `paths`, trusting `ca` (default: same)."""
    return dict(
        tls_cert=str(paths["server.pem"]),
        tls_key=str(paths["server-key.pem"]),
        tls_ca=str((ca or paths)["ca.pem"]),
    )


class SecureMesh:
    """Stages and an orchestrator in this process, each with its own TLS settings."""

    def __init__(self, model_dir: Path, stage_tls: list[dict], orch_tls: dict, **orch_kwargs):
        self.servers = []
        self.addresses = []
        for settings in stage_tls:
            server, port, _ = build_stage(
                StageConfig(model=str(model_dir), kv_cache_mb=64, **settings)
            )
            server.start()
            self.servers.append(server)
            self.addresses.append(f"127.0.0.1:{port}")
        config = OrchestratorConfig(
            model=str(model_dir),
            port=0,
            stages=tuple(self.addresses),
            stage_wait_s=orch_kwargs.pop("stage_wait_s", 10),
            **orch_tls,
            **orch_kwargs,
        )
        server, port, self.orchestrator = build_orchestrator(config)
        server.start()
        self.servers.append(server)
        self.orchestrator.start()
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.orchestrator.close()
        for server in self.servers:
            server.stop(0)
