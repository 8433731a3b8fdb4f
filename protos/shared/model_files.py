"""What every service knows about a model directory (config.json + *.safetensors), without torch:
the model's shape (`LlamaArgs`), which file holds which tensor and its shape (`TensorIndex`,
read from the safetensors *headers* only) and the fingerprint stages and the orchestrator compare
so that everyone serves the same weights. Loading tensors is the stage's job
(stage_service/weights.py); the orchestrator and the client never import torch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from protos.errors import FailedPrecondition
from protos.shared.model_family import context_limit, family_of

# The checkpoint's tensor names (HF layout), the one table every service reads them from.
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
LAYER_PREFIX = "model.layers."


def layer_tensor(layer: int, part: str) -> str:
    """The name of a layer's tensor: layer_tensor(3, "self_attn.q_proj.weight")."""
    return f"{LAYER_PREFIX}{layer}.{part}"


# What config.json must name for LlamaArgs (the rest has defaults).
LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)  # fmt: skip


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": ..., params}; {} = default
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q, k and v projections
    o_bias: bool = False  # a bias on the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm of each q and k head before RoPE (Qwen3)
    family: str = "llama"  # config.json's model_type (protos/shared/model_family.py)

    @classmethod
    def from_config(cls, cfg: dict) -> LlamaArgs:
        """From a config.json dict, old (rope_theta + rope_scaling) or new (rope_parameters).
        A config our model code would not compute exactly is refused (model_family)."""
        missing = [k for k in LLAMA_KEYS if k not in cfg]
        if missing:
            raise FailedPrecondition(
                f"config.json lacks {', '.join(map(repr, missing))} (model_type "
                f"{cfg.get('model_type')!r}): not a Llama-family config"
            )
        family = family_of(cfg)
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        # dynamic NTK RoPE equals the default one up to the original context (context_limit)
        rope = {**rope, "rope_type": rope_type} if rope_type not in ("default", "dynamic") else {}
        bias = bool(cfg.get("attention_bias", False))
        positions = cfg.get("max_position_embeddings", 2048)
        if rope_type == "llama3":  # its wavelengths are the checkpoint's, not a capped context
            rope.setdefault("original_max_position_embeddings", positions)
        limit = context_limit(cfg)
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            max_position_embeddings=min(positions, limit) if limit else positions,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=bias if family.qkv_bias is None else family.qkv_bias,
            o_bias=bias if family.o_bias is None else family.o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family.qk_norm,
            family=family.model_type,
        )


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FailedPrecondition(
            f"{model_dir} has no config.json; pass --model DIR of an HF-layout model "
            "(`llamadist model fetch-default` makes one)"
        )
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise FailedPrecondition(f"{path}: config.json is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise FailedPrecondition(f"{path}: config.json is not a JSON object")
    return config


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FailedPrecondition(f"{model_dir} has no *.safetensors files")
    return files


def safetensors_header(path: Path) -> bytes:
    """The raw JSON header of a safetensors file (names, dtypes, shapes, offsets)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (-1,)
        header = f.read(length) if 0 <= length <= MAX_HEADER_BYTES else b""
    if len(header) != length or length < 2:
        raise FailedPrecondition(f"{path} is not a safetensors file (its header is cut or absent)")
    return header


def tensor_headers(path: Path) -> dict[str, dict]:
    """A safetensors file's tensors (name -> dtype, shape, data_offsets), refused with the
    file's name when its header is not JSON or its data is shorter than the header says (a
    truncated copy): better here, in one line, than as a SafetensorError at load."""
    header = safetensors_header(path)
    try:
        entries = json.loads(header)
        tensors = {k: v for k, v in entries.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise FailedPrecondition(f"{path}: the safetensors header is malformed ({err})") from None
    data = path.stat().st_size - 8 - len(header)
    if data < end:
        raise FailedPrecondition(
            f"{path} is truncated: its header names {end} bytes of tensor data, the file holds "
            f"{data} (copy it again)"
        )
    return tensors


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on a header
FINGERPRINT_WINDOWS = 32  # windows of weight bytes sampled per file
FINGERPRINT_WINDOW_BYTES = 4096


def model_fingerprint(model_dir: Path, config: dict | None = None) -> str:
    """sha256 over config.json, every safetensors header and a sample of each file's weight
    bytes (FINGERPRINT_WINDOWS windows spread evenly over its data, the first and last
    included): cheap (128 KiB read per file), and it changes with the architecture, the tensor
    layout, and weights that differ throughout (another seed, a fine-tune). It is not a hash of
    every byte: two checkpoints that differ only between the windows look alike. `config`
    replaces config.json's contents (a submodel's digest leaves its own record out)."""
    config = read_config(model_dir) if config is None else config
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in safetensors_files(model_dir):
        header = safetensors_header(path)
        digest.update(path.name.encode())
        digest.update(header)
        start, end = 8 + len(header), path.stat().st_size
        span = max(0, end - start - FINGERPRINT_WINDOW_BYTES)
        with open(path, "rb") as f:
            for i in range(FINGERPRINT_WINDOWS):
                f.seek(start + span * i // (FINGERPRINT_WINDOWS - 1))
                digest.update(f.read(FINGERPRINT_WINDOW_BYTES))
    return digest.hexdigest()[:16]


class TensorIndex:
    """Which safetensors file holds which tensor name, and its shape (from the headers)."""

    def __init__(self, model_dir: Path):
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in safetensors_files(model_dir):
            for name, info in tensor_headers(path).items():
                self.location[name] = path
                self.shapes[name] = tuple(info["shape"])

    def has(self, name: str) -> bool:
        return name in self.location

    def by_file(self, names: list[str]) -> dict[Path, list[str]]:
        """The names grouped by the file that holds them, so each file is opened once."""
        grouped: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.location:
                raise FailedPrecondition(f"tensor {name} is missing from the model's safetensors")
            grouped.setdefault(self.location[name], []).append(name)
        return grouped
