"""The Llama family as people run it (issue 24): tiny random checkpoints of each family we serve,
made by transformers' own classes, give transformers' greedy tokens through 2- and 3-stage
meshes, on the C layer (the CPU default) and the torch path, in float and through int8/int4
(against transformers on the dequantized weights). Every config field that would change the
math and that our code does not compute is refused before anything serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from protos.errors import FailedPrecondition
from protos.shared.model_files import LlamaArgs, read_config
from stage_service.config import StageConfig
from stage_service.stage import Stage
from stage_service.weights import Quantization
from tests.conftest import TINY_BASE, in_process_mesh, reference_greedy
from tests.dequantize import write_dequantized

PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]
NEW_TOKENS = 16
SMALL = {**TINY_BASE, "num_hidden_layers": 3}

# (transformers config class, fields): odd head counts, GQA, each family's own tensors.
FAMILIES = {
    "qwen2": (Qwen2Config, dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1)),
    "qwen3": (
        Qwen3Config,
        dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16),
    ),  # head_dim 16, not hidden / heads = 8
    "qwen3_bias": (Qwen3Config, dict(num_attention_heads=4, head_dim=24, attention_bias=True)),
    "mistral": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_linear_rope": (
        LlamaConfig,
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=10000.0),
    ),
    "llama_dynamic_rope": (
        LlamaConfig,
        dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}, rope_theta=10000.0),
    ),
}


def make_family_model(root: Path, name: str, seed: int = 0) -> Path:
    """A random checkpoint of family `name` saved by transformers; its biases and norm weights
    random too (transformers starts them at 0 and 1, where a missing one would go unseen)."""
    out = root / name
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM

    config_class, fields = FAMILIES[name]
    torch.manual_seed(seed)
    config = config_class(**{**SMALL, **fields})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
            elif n.endswith("norm.weight"):
                p.normal_(1, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def family_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


# (device, --batch-invariant): on a CPU auto is the C layer (the default) and off the torch path;
# on a GPU auto is the torch path with static KV and CUDA graphs, on the Triton kernels.
MODES = [("cpu", "auto"), ("cpu", "off")]
if torch.cuda.is_available():
    MODES += [("cuda", "auto"), ("cuda", "on")]


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("device, mode", MODES)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_generates_as_transformers(family_root, name, device, mode, stages):
    model_dir = make_family_model(family_root, name)
    expected = reference_greedy(model_dir, PROMPT, NEW_TOKENS)
    stage = dict(device=device, batch_invariant=mode, dtype="float32")
    options = dict(stage_options=stage, speculate="off")
    with in_process_mesh(model_dir, stages, **options) as mesh:
        got = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
        spec = mesh.client.generate(token_ids=PROMPT + PROMPT, max_new_tokens=8, speculate="lookup")
    assert got.token_ids == expected
    assert spec.token_ids == reference_greedy(model_dir, PROMPT + PROMPT, 8)


@pytest.mark.parametrize("mode", ["auto", "off"])
@pytest.mark.parametrize("setting", ["int8", "int4"])
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral"])
def test_each_family_quantized_generates_as_transformers_dequantized(
    family_root, tmp_path, name, setting, mode
):
    model_dir = make_family_model(family_root, name)
    reference = tmp_path / "dequantized"
    write_dequantized(model_dir, reference, Quantization(setting, 32))
    expected = reference_greedy(reference, PROMPT, NEW_TOKENS)
    stage = dict(quantize=setting, quant_group=32, batch_invariant=mode)
    options = dict(stage_options=stage, speculate="off")
    with in_process_mesh(model_dir, 2, **options) as mesh:
        got = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == expected


def test_a_sliding_window_in_use_bounds_the_context(family_root, tmp_path):
    """Mistral with a window of 24: within it full attention is the model's; past it a session
    is refused, not computed with attention the model does not have."""
    model_dir = make_family_model(family_root, "mistral")
    windowed = tmp_path / "windowed"
    windowed.mkdir()
    for f in model_dir.iterdir():
        (windowed / f.name).write_bytes(f.read_bytes())
    config = read_config(windowed)
    (windowed / "config.json").write_text(json.dumps({**config, "sliding_window": 24}))
    assert LlamaArgs.from_config(read_config(windowed)).max_position_embeddings == 24
    with in_process_mesh(windowed, 2, speculate="off") as mesh:
        got = mesh.client.generate(token_ids=PROMPT, max_new_tokens=12)
        assert got.token_ids == reference_greedy(windowed, PROMPT, 12)
        with pytest.raises(Exception, match="24 tokens a session may reach"):
            mesh.client.generate(token_ids=PROMPT, max_new_tokens=13)


def _llama_config(**fields) -> dict:
    return {**LlamaConfig(**SMALL).to_dict(), **fields}


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(model_type="gemma2"), "model_type='gemma2'"),
        (dict(model_type="qwen3_moe"), "model_type='qwen3_moe'"),
        (dict(architectures=["MixtralForCausalLM"]), "architectures"),
        (dict(num_local_experts=8, num_experts_per_tok=2), "num_local_experts=8"),
        (dict(num_experts=4), "num_experts=4"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn'"),
        (dict(rope_scaling={"rope_type": "longrope"}), "rope_type='longrope'"),
        (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act='gelu_pytorch_tanh'"),
        (dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
        (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config"),
        (dict(model_type="qwen2", attention_bias=False), "attention_bias=False"),
        (dict(model_type="mistral", mlp_bias=True), "mlp_bias=True"),
        (dict(model_type="mistral", architectures=["LlamaForCausalLM"]), "architectures"),
    ],
)
def test_what_our_code_does_not_compute_is_refused_naming_the_field(fields, words):
    with pytest.raises(FailedPrecondition) as err:
        LlamaArgs.from_config(_llama_config(**fields))
    message = str(err.value)
    assert words in message and "not supported" in message and "\n" not in message, message


def test_harmless_and_off_fields_are_taken():
    """Fields of real checkpoints that leave the math alone, and math fields at their 'off'
    value, do not refuse a checkpoint."""
    config = _llama_config(
        pretraining_tp=1, attention_dropout=0.0, num_local_experts=0, quantization_config=None,
        torch_dtype="bfloat16", use_cache=True, transformers_version="4.45.0",
    )  # fmt: skip
    assert LlamaArgs.from_config(config).family == "llama"


def _broken_copy(model_dir: Path, out: Path, config_fields: dict, drop: str = "") -> Path:
    from safetensors.torch import load_file, save_file

    out.mkdir()
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors.pop(drop, None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**read_config(model_dir), **config_fields}))
    return out


def test_a_stage_refuses_an_unsupported_checkpoint_before_it_serves(family_root, tmp_path):
    model_dir = make_family_model(family_root, "qwen2")
    gemma = _broken_copy(model_dir, tmp_path / "gemma", {"model_type": "gemma"})
    with pytest.raises(FailedPrecondition, match="model_type='gemma'"):
        Stage(StageConfig(model=str(gemma)))


def test_an_untied_head_is_never_the_embedding(family_root, tmp_path):
    """tie_word_embeddings false and no lm_head.weight: refused, where the old code served the
    embedding as the head (another model's output)."""
    model_dir = make_family_model(family_root, "mistral")
    headless = _broken_copy(model_dir, tmp_path / "headless", {}, drop="lm_head.weight")
    stage = Stage(StageConfig(model=str(headless)))
    with pytest.raises(FailedPrecondition, match="no lm_head.weight"):
        stage.load_layers(0, 3, epoch=1)


def test_a_tensor_of_another_shape_is_refused(family_root, tmp_path):
    """A Qwen3 checkpoint whose config says another head_dim: the q_norm tensors do not fit."""
    model_dir = make_family_model(family_root, "qwen3")
    wrong = _broken_copy(model_dir, tmp_path / "wrong", {"head_dim": 8})
    stage = Stage(StageConfig(model=str(wrong)))
    with pytest.raises(FailedPrecondition, match="config.json implies"):
        stage.load_layers(0, 3, epoch=1)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_families_over_submodels_and_weights_over_the_wire(family_root, tmp_path, name):
    """A family's own tensors (q/k/v biases, q/k norms) go where its layers go: into each
    stage's submodel, and over the wire to stages without a model directory."""
    from protos.shared.submodel import split
    from tests.conftest import fetching

    model_dir = make_family_model(family_root, name)
    expected = reference_greedy(model_dir, PROMPT, NEW_TOKENS)
    dirs = split(model_dir, tmp_path / "split", [(0, 1), (1, 3)])
    options = dict(strategy="custom", boundaries="0-0,1-2", speculate="off")
    with in_process_mesh(model_dir, 2, stage_models=dirs, **options) as mesh:
        on_submodels = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
    with in_process_mesh(model_dir, 2, **fetching(tmp_path, 2), **options) as mesh:
        shipped = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
    assert on_submodels.token_ids == expected == shipped.token_ids
