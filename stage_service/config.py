"""The stage process's one frozen config, built from the command line in `client/cli.py`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protos.codec import DTYPE_NAMES
from protos.security import check_tls_flags


@dataclass(frozen=True)
class StageConfig:
    model: str  # HF-layout model directory
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port (printed when listening)
    device: str = "cpu"
    dtype: str = ""  # "" = float32 on CPU, bfloat16 on GPU
    kv_cache_mb: int = 1024
    # KV layout (stage_service/kv_cache.py): "auto" = static slots on CUDA, growable on CPU.
    static_kv: str = "auto"
    max_context: int = 0  # tokens a session may reach; 0 = the model's context
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs (static slots on CUDA only)
    compile: bool = False  # torch.compile the decode step's elementwise parts (static slots)
    session_ttl_s: float = 600.0
    threads: int = 1
    max_workers: int = 128  # most wait for the compute thread's next batch
    max_batch: int = 64  # sessions one forward may batch
    max_batch_tokens: int = 8192  # rows (tokens) one forward may batch
    grace_s: float = 5.0
    # Mutual TLS: this stage's certificate and key, and the CA that must have signed every
    # caller's certificate (the orchestrator's). All empty = plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def __post_init__(self) -> None:
        check_tls_flags(self.tls_cert, self.tls_key, self.tls_ca)
        if self.dtype and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.kv_cache_mb <= 0:
            raise ValueError("--kv-cache-mb must be positive")
        if self.static_kv not in ("auto", "on", "off"):
            raise ValueError(f"--static-kv must be auto, on or off, got {self.static_kv!r}")
        if self.max_context < 0:
            raise ValueError("--max-context must be >= 0 (0 = the model's context)")
        if self.threads <= 0:
            raise ValueError("--threads must be positive")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device must be cpu or cuda:N, got {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype:
            return DTYPE_NAMES[self.dtype]
        return torch.float32 if self.device == "cpu" else torch.bfloat16

    @property
    def use_static_kv(self) -> bool:
        return self.static_kv == "on" or (self.static_kv == "auto" and self.device != "cpu")
