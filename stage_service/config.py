"""The stage process's one frozen config. Each field is a knob (protos/shared/knobs.py): its
default, help and check are written here once; `llamadist stage` derives its flags and the
LLAMADIST_STAGE_<FIELD> environment defaults from them. No torch at import: the command line
builds its parser from this module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protos import llamadist_pb2 as pb
from protos.shared.default_model import default_model_dir
from protos.shared.knob_checks import in_range, non_negative, positive
from protos.shared.knobs import ConfigError, ServiceConfig, knob
from protos.shared.stage_auth import key_file_problem

if TYPE_CHECKING:
    import torch

ENV_PREFIX = "LLAMADIST_STAGE"
# --dtype's names: the wire's (llamadist.proto's DType, as protos.codec.DTYPE_NAMES names them)
DTYPES = tuple(name.lower() for name, number in pb.DType.items() if number)  # not UNSPECIFIED
QUANTIZE = ("none", "int8", "int4")  # see stage_service/quant.py
# Inputs per scale when --quant-group is 0. int8: 64 (per output channel cost the default
# model 1.3% perplexity, 128 0.7%, 64 0.3%); int4: 32, as llama.cpp's Q4 formats.
DEFAULT_GROUP = {"int8": 64, "int4": 32}


def _group(size: int) -> str | None:
    if size < 0 or size % 16:
        return f"must be 0 (the default of --quantize) or a positive multiple of 16, got {size}"
    return None


def _device(name: str) -> str | None:
    kind, _, index = name.partition(":")
    if name == "cpu" or (kind == "cuda" and (not index or index.isdigit())):
        return None
    return f"must be cpu, cuda or cuda:N, got {name!r}"


def _default_stage_model() -> str:
    """The default model's directory where this host has it, else none (--fetch-weights)."""
    path = default_model_dir()
    return str(path) if (path / "config.json").is_file() else ""


@dataclass(frozen=True, kw_only=True)
class StageConfig(ServiceConfig):
    model: str = ServiceConfig.knob_default("model", default_factory=_default_stage_model)
    fetch_weights: bool = knob(
        False,
        "take the tensors of its range that --model lacks (all, without --model) from the "
        "orchestrator, verified by hash and kept in --weights-cache",
    )
    weights_cache: str = knob(
        default_factory=lambda: str(Path.home() / ".cache" / "llamadist" / "weights"),
        help="directory of the tensors the orchestrator shipped, one file per sha256",
        metavar="DIR",
    )
    weights_cache_mb: int = knob(
        65536, "most MiB the weights cache may hold (least recently used go first)", check=positive
    )
    hop_port: int = knob(
        0,
        "TCP port of the hop socket with --hop socket (0 = any free one; Info advertises it)",
        check=in_range(0, 65535),
    )
    device: str = knob("cpu", "cpu, cuda or cuda:N", check=_device)
    dtype: str = knob(
        "",
        "weights and activations ('' = float32 on CPU, bfloat16 on GPU)",
        choices=("", *DTYPES),
    )
    allow_slow_dtype: bool = knob(
        False,
        "run --dtype bfloat16/float16 on a CPU without instructions for it, where it is slower "
        "than float32 (7x at 64 rows on an AVX2 CPU: bench/CPU_NOTES.md), or --quantize int8 "
        "on a GPU (20x slower than bf16 on an H200: bench/GPU_NOTES.md)",
    )
    batch_invariant: str = knob(
        "auto",
        "every row's result bit-identical whatever else shares its step (rows, order, prefill "
        "chunks, drafts): kernels whose sums run in one order for the matmuls, attention, norms "
        "and sampling "
        "(README: what 'identical' means). auto: on for CPU, where it measured faster; off for "
        "CUDA, where it measured 0.93x at batch 1 and 0.72x at 64 sessions",
        choices=("auto", "on", "off"),
    )
    metrics_port: int = knob(
        0, "serve Prometheus metrics at /metrics on this port (0 = off)", check=in_range(0, 65535)
    )
    quantize: str = knob(
        "none",
        "weight-only quantization of the range's matrices, a scale per --quant-group inputs: "
        "int8 (symmetric) or int4 (with a minimum); embedding and head are int8 per row",
        choices=QUANTIZE,
    )
    quant_group: int = knob(
        0, "inputs per quantization scale (0: 64 for int8, 32 for int4)", check=_group
    )
    kv_cache_mb: int = knob(1024, "KV cache budget in MiB", check=positive)
    static_kv: str = knob(
        "auto",
        "KV in static slots, decode as CUDA graphs (auto: on for CUDA, off for CPU)",
        choices=("auto", "on", "off"),
    )
    max_context: int = knob(
        0,
        "most tokens a session may reach (0 = the model's); static slots are this long",
        check=non_negative,
    )
    cuda_graphs: bool = knob(
        True, "static KV on CUDA: replay decode steps as CUDA graphs (off: eager, for debugging)"
    )
    compile: bool = knob(
        False, "static KV: fuse the decode step's small kernels with torch.compile (slower start)"
    )
    session_ttl_s: float = knob(600.0, "idle session lifetime in seconds", check=positive)
    threads: int = knob(
        1,
        "torch threads; give several stages on one host a share of the cores each",
        check=positive,
    )
    max_batch: int = knob(64, "sessions one forward may batch", check=in_range(1, 4096))
    max_batch_tokens: int = knob(8192, "rows (tokens) one forward may batch", check=positive)
    key_file: str = knob(
        "",
        "the mesh's stage key, a file of one line that the orchestrator reads too: every stage "
        "RPC but Health must carry it. A stage needs it or mutual TLS, unless told to run open",
        check=key_file_problem,
        flag="--stage-key-file",
        metavar="FILE",
    )
    insecure_open_stage: bool = knob(
        False,
        "serve without a credential: anyone who can reach the stage can read its state, drop "
        "or change its layers and run steps on any session (tests, a sealed network only)",
    )

    no_model_hint = ", or --fetch-weights to take every tensor from the orchestrator"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.insecure_open_stage and (self.key_file or self.tls_ca):
            raise ConfigError(
                "--insecure-open-stage with a credential (--stage-key-file or --tls-*): give "
                "one or the other",
                "insecure_open_stage",
            )

    def check_credential(self) -> None:
        """A stage starts with a credential, or open when told so (ConfigError otherwise)."""
        if not (self.key_file or self.tls_ca or self.insecure_open_stage):
            raise ConfigError(
                "a stage needs a credential: --stage-key-file FILE (the mesh's stage key; "
                "`llamadist up` makes one), or --tls-cert/--tls-key/--tls-ca (mutual TLS), or "
                "--insecure-open-stage to let anyone who can reach it in",
                "key_file",
            )

    @property
    def needs_model(self) -> bool:
        return not self.fetch_weights

    @property
    def torch_dtype(self) -> torch.dtype:
        from protos.codec import DTYPE_NAMES  # torch, only where a stage runs

        if self.dtype:
            return DTYPE_NAMES[self.dtype]
        return DTYPE_NAMES["float32" if self.device == "cpu" else "bfloat16"]

    @property
    def group(self) -> int:
        """Inputs per quantization scale (0 without quantization)."""
        return self.quant_group or DEFAULT_GROUP.get(self.quantize, 0)

    @property
    def weight_format(self) -> str:
        """What Info reports: none, int8-g<group> or int4-g<group>."""
        return "none" if self.quantize == "none" else f"{self.quantize}-g{self.group}"

    @property
    def use_batch_invariant(self) -> bool:
        """auto: on a CPU where its C kernels run (else the torch path, as before)."""
        if self.batch_invariant != "auto":
            return self.batch_invariant == "on"
        if self.device != "cpu":
            return False
        from stage_service import cpu_kernels  # torch, only where a stage runs

        return cpu_kernels.load()[0] is not None

    @property
    def use_static_kv(self) -> bool:
        return self.static_kv == "on" or (self.static_kv == "auto" and self.device != "cpu")
