"""Shared fixtures: tiny random Llama models saved as safetensors, the default model, and
in-process meshes (real gRPC servers on port 0) whose stages take the tests' stage key;
`require_or_skip`, the strict mode's skip."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from client.client import Client
from orchestrator.config import OrchestratorConfig
from orchestrator.server import build_server as build_orchestrator
from protos.shared.stage_auth import HEADER, load_stage_key, make_stage_key, stage_channel
from stage_service.config import StageConfig
from stage_service.server import build_server as build_stage
from tests.stage_servers import Stages

torch.set_num_threads(1)

TINY_BASE = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

TINY_CONFIGS = {
    "gqa": {},
    "odd_layers_tied": dict(
        num_hidden_layers=5,
        hidden_size=48,
        num_attention_heads=3,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    ),
    "llama3_rope": dict(
        num_hidden_layers=3,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        rope_theta=500000.0,
    ),
    "attention_bias": dict(
        num_hidden_layers=3,
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=3,
        attention_bias=True,
        mlp_bias=True,
    ),
    "untied_mha": dict(num_hidden_layers=6, num_key_value_heads=4),
}


def make_tiny_model(root: Path, name: str, seed: int = 0) -> Path:
    """A random LlamaForCausalLM saved with safetensors; returns its directory."""
    out = root / name
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_BASE, **TINY_CONFIGS[name]})
    model = LlamaForCausalLM(config).eval()
    if config.attention_bias or config.mlp_bias:
        with torch.no_grad():  # biases start at zero; make them matter
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def make_tokenizer_model(out: Path, default_model: Path) -> Path:
    """A random LlamaForCausalLM of the tiny shape (TINY_BASE) with the default model's
    tokenizer files, chat template, vocabulary size and special token ids: prompts, chats and
    stop strings work on it as on the default model, at a tiny model's speed."""
    from orchestrator.tokenizer import Tokenizer

    if (out / "config.json").is_file():
        return out
    base = json.loads((default_model / "config.json").read_text())
    torch.manual_seed(0)
    config = LlamaConfig(
        **{
            **TINY_BASE,
            "vocab_size": base["vocab_size"],
            "bos_token_id": base["bos_token_id"],
            "eos_token_id": base["eos_token_id"],
            "pad_token_id": base.get("pad_token_id"),
            "tie_word_embeddings": base.get("tie_word_embeddings", False),
        }
    )
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (default_model / name).is_file():
            shutil.copy(default_model / name, out / name)
    tokenizer = Tokenizer(out)
    assert tokenizer.hf is not None and tokenizer.hf.chat_template, "no tokenizer or template"
    assert len(tokenizer.hf) <= base["vocab_size"], (len(tokenizer.hf), base["vocab_size"])
    assert tokenizer.eos_ids == {base["eos_token_id"]}, tokenizer.eos_ids
    return out


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """`llamadist stage` / `orchestrator` run in this process (main(argv)) set the root logger up
    for their process: a handler on the test's captured stderr, which later tests would write
    to once it is closed ('--- Logging error ---' in their output). Each test's is undone."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:  # pytest's own capture handlers come and go by phase
        if handler not in before and type(handler).__module__ != "_pytest.logging":
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """The security tests' development CAs (tests/secure_mesh.py): `good` (the mesh's) and
    `rogue`, and the API keys file."""
    from tests.secure_mesh import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture
def tiny(tiny_root) -> Path:
    """The tiny model with grouped-query attention (4 layers) the stage tests serve."""
    return make_tiny_model(tiny_root, "gqa")


@pytest.fixture
def two_stages(tiny) -> Iterator[Stages]:
    """`tiny` as two open stages on port 0, layers 0-1 and 2-3."""
    stages = Stages(tiny, [0, 2, 4])
    yield stages
    stages.stop()


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The embedded default model (converted once into the cache; no hub download)."""
    from client.default_model import fetch_default

    return fetch_default()


def reference_model(model_dir: Path) -> LlamaForCausalLM:
    """transformers' own class for the checkpoint's family (LlamaForCausalLM for Llama,
    Qwen2ForCausalLM for Qwen2, ...), in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def reference_greedy(model_dir: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' own generate, greedy, never stopping at end-of-sequence."""
    model = reference_model(model_dir)
    config = model.generation_config
    config.eos_token_id = None
    config.pad_token_id = 0
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            generation_config=config,
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


@functools.cache
def stage_key_file() -> str:
    """The tests' stage key (one file per test process): give it to in-process stages and
    orchestrators as `stage_key_file` (STAGE_KEY), to stage processes as --stage-key-file."""
    folder = tempfile.mkdtemp(prefix="llamadist-test-key-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / "stage-key"
    make_stage_key(path)
    return str(path)


def stage_key() -> dict[str, str]:
    """StageConfig options with the tests' stage key."""
    return {"key_file": stage_key_file()}


def orchestrator_stage_key() -> dict[str, str]:
    """OrchestratorConfig options with the tests' stage key."""
    return {"stage_key_file": stage_key_file()}


def keyed_channel(address: str) -> grpc.Channel:
    """A plaintext channel to a stage that sends the tests' stage key on every call."""
    return stage_channel(address, key=load_stage_key(stage_key_file()))


def keyed_metadata() -> tuple[tuple[str, str], ...]:
    """Call metadata with the tests' stage key (for a channel of one's own)."""
    return ((HEADER, load_stage_key(stage_key_file())),)


class InProcessMesh:
    """Stage servers and an orchestrator, real gRPC on loopback port 0, in this process."""

    def __init__(
        self,
        model_dir: Path,
        num_stages: int,
        kv_cache_mb: int = 64,
        plan_stages: int = 0,
        stage_options: dict | None = None,
        stage_models: list[Path | str] | None = None,
        stage_options_per_stage: list[dict] | None = None,
        **orchestrator_options,
    ):
        """Starts `num_stages` stages (StageConfig `stage_options`, and stage i's own
        `stage_options_per_stage[i]`; stage i on `stage_models[i]` where given, '' for none,
        else on `model_dir`); the first plan uses the first `plan_stages` (0 = all)."""
        self.stage_servers = []
        self.stages = []
        addresses = []
        for i in range(num_stages):
            own = stage_models[i] if stage_models else model_dir  # a submodel, or the model
            options = {**(stage_options or {}), **(stage_options_per_stage or [{}] * num_stages)[i]}
            server, port, stage = build_stage(
                StageConfig(model=str(own), kv_cache_mb=kv_cache_mb, **{**stage_key(), **options})
            )
            server.start()
            self.stage_servers.append(server)
            self.stages.append(stage)
            addresses.append(f"127.0.0.1:{port}")
        self.addresses = addresses
        config = OrchestratorConfig(
            model=str(model_dir),
            port=0,
            stages=tuple(addresses[: plan_stages or num_stages]),
            stage_wait_s=10,
            **{**orchestrator_stage_key(), **orchestrator_options},
        )
        self.config = config
        self.server, port, self.orchestrator = build_orchestrator(config)
        self.server.start()
        self.orchestrator.start()
        self.address = f"127.0.0.1:{port}"
        self.client = Client(self.address, timeout_s=60)

    def stop(self) -> None:
        self.client.close()
        self.server.stop(0)
        self.orchestrator.close()
        for server in self.stage_servers:
            server.stop(0)
        for stage in self.stages:
            stage.close()


def fetching(tmp_path: Path, n: int, **extra) -> dict:
    """in_process_mesh options: n stages without a model directory, each with its own weights
    cache (the orchestrator ships them the weights)."""
    caches = [str(tmp_path / f"cache-{i}") for i in range(n)]
    return dict(
        stage_models=[""] * n,
        stage_options_per_stage=[dict(fetch_weights=True, weights_cache=c) for c in caches],
        **extra,
    )


@contextmanager
def in_process_mesh(model_dir: Path, num_stages: int, **kwargs) -> Iterator[InProcessMesh]:
    mesh = InProcessMesh(model_dir, num_stages, **kwargs)
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture
def mesh_factory():
    return in_process_mesh


REQUIRABLE = ("netns", "compose", "compile")  # the parts LLAMADIST_REQUIRE may name


def required_parts() -> set[str]:
    return {p.strip() for p in os.environ.get("LLAMADIST_REQUIRE", "").split(",") if p.strip()}


# The environment defaults of --stage-key-file: every stage and orchestrator process a test
# starts (and `llamadist stage` run in this process) takes the tests' stage key.
STAGE_KEY_ENV = ("LLAMADIST_STAGE_KEY_FILE", "LLAMADIST_ORCHESTRATOR_STAGE_KEY_FILE")


def pytest_configure(config: pytest.Config) -> None:
    for name in STAGE_KEY_ENV:
        os.environ[name] = stage_key_file()
    unknown = required_parts() - set(REQUIRABLE)
    if unknown:  # a typo must not turn the strict mode off
        raise pytest.UsageError(
            f"LLAMADIST_REQUIRE names {sorted(unknown)}; the parts are {', '.join(REQUIRABLE)}"
        )


def require_or_skip(part: str, reason: str) -> NoReturn:
    """Skips the test, saying `reason`; fails it instead when LLAMADIST_REQUIRE (a comma list of
    REQUIRABLE parts) names `part`. CI (.ci/run) sets it, so a part that cannot run there is a
    failure, not a skip nobody reads."""
    assert part in REQUIRABLE, part
    if part in required_parts():
        pytest.fail(f"{reason} (LLAMADIST_REQUIRE names {part!r}: it must run)", pytrace=False)
    pytest.skip(reason)
