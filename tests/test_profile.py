"""ModelProfile from the safetensors headers, cross-checked against the tensors themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from orchestrator.profile import ModelProfile, StageCapacity
from protos.errors import FailedPrecondition, InvalidArgument
from protos.shared.layer_range import LayerRange
from protos.shared.model_files import LlamaArgs
from stage_service.weights import load_range, weight_bytes
from tests.conftest import TINY_CONFIGS, make_tiny_model


def actual_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = f.get_tensor(name)
    return tensors


def config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_layer_bytes_are_the_sizes_of_the_real_tensors(tiny_root, name):
    model_dir = make_tiny_model(tiny_root, name)
    tensors = actual_tensors(model_dir)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    profile = ModelProfile.from_model_dir(model_dir, dtype_bytes=4)
    cfg = config(model_dir)
    assert profile.num_layers == cfg["num_hidden_layers"]
    expected = [
        sum(
            t.numel() * t.element_size()
            for n, t in tensors.items()
            if n.startswith(f"model.layers.{i}.")
        )
        for i in range(profile.num_layers)
    ]
    assert list(profile.layer_bytes) == expected
    assert profile.embed_bytes == tensors["model.embed_tokens.weight"].nbytes
    assert profile.norm_bytes == tensors["model.norm.weight"].nbytes
    # Half the bytes at a 2-byte serving dtype, whatever the files hold.
    half = ModelProfile.from_model_dir(model_dir, dtype_bytes=2)
    assert [2 * b for b in half.layer_bytes] == expected
    assert 2 * half.embed_bytes == profile.embed_bytes


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tied_and_untied_heads(tiny_root, name):
    model_dir = make_tiny_model(tiny_root, name)
    tensors = actual_tensors(model_dir)
    profile = ModelProfile.from_model_dir(model_dir)
    tied = bool(config(model_dir).get("tie_word_embeddings"))
    assert profile.tied is tied
    if tied:
        assert "lm_head.weight" not in tensors
        assert profile.head_bytes == profile.embed_bytes
    else:
        assert profile.head_bytes == tensors["lm_head.weight"].nbytes


def test_an_untied_config_without_a_head_is_refused_by_profile_and_stage(tiny_root, tmp_path):
    """Untied in config.json but no lm_head tensor: once served with the embedding as its head
    (another model's output); now the planner and the stage refuse it, naming the tensor."""
    from safetensors.torch import save_file

    source = make_tiny_model(tiny_root, "gqa")  # untied, lm_head stored
    tensors = actual_tensors(source)
    del tensors["lm_head.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config(source)))
    with pytest.raises(FailedPrecondition, match="no lm_head.weight"):
        ModelProfile.from_model_dir(tmp_path)
    args = LlamaArgs.from_config(config(tmp_path))
    with pytest.raises(FailedPrecondition, match="no lm_head.weight"):
        load_range(tmp_path, args, 0, args.num_layers, torch.float32, torch.device("cpu"))


def test_the_head_is_tied_exactly_when_a_stage_loads_the_embeddings_as_head(tiny_root, tmp_path):
    """A checkpoint tied in config.json with an lm_head tensor too: the stage ignores the tensor.
    The profile must count the bytes the stage really holds, for one stage holding everything
    (a tied head shares the embedding matrix) and for a last stage alone."""
    from safetensors.torch import save_file

    source = make_tiny_model(tiny_root, "gqa")  # untied, lm_head stored
    tensors = actual_tensors(source)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(
        json.dumps(config(source) | {"tie_word_embeddings": True})
    )
    profile = ModelProfile.from_model_dir(tmp_path)
    assert profile.tied and profile.head_bytes == profile.embed_bytes
    args = LlamaArgs.from_config(config(tmp_path))
    num = profile.num_layers
    for r in (LayerRange(0, num), LayerRange(num - 1, num)):
        first = r.start == 0
        loaded = load_range(tmp_path, args, r.start, r.end, torch.float32, torch.device("cpu"))
        assert (loaded.head is loaded.embed) is first  # one matrix for both, when both are here
        assert profile.stage_weight_bytes(r, first, True) == weight_bytes(loaded)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_kv_bytes_and_flops_follow_the_config(tiny_root, name):
    model_dir = make_tiny_model(tiny_root, name)
    args = LlamaArgs.from_config(config(model_dir))
    tensors = actual_tensors(model_dir)
    profile = ModelProfile.from_model_dir(model_dir, dtype_bytes=2, context=100)
    assert profile.kv_bytes_per_token_per_layer == 2 * args.num_kv_heads * args.head_dim * 2
    # The KV cache the stage really allocates per token per layer: K and V rows.
    assert profile.kv_bytes_per_token_per_layer == (
        2 * tensors["model.layers.0.self_attn.k_proj.weight"].shape[0] * 2
    )
    matmuls = sum(
        t.numel()
        for n, t in tensors.items()
        if n.startswith("model.layers.0.") and n.endswith("_proj.weight")
    )
    attention = 4 * args.num_heads * args.head_dim
    assert profile.layer_flops_decode[0] == 2 * matmuls + attention * 100
    assert profile.layer_flops_prefill[0] == 2 * matmuls + attention * 50
    assert profile.head_flops == 2 * args.vocab_size * args.hidden_size


def splits(num_layers: int, n: int):
    """Every contiguous split of num_layers into n non-empty ranges."""
    from itertools import combinations

    for cuts in combinations(range(1, num_layers), n - 1):
        bounds = (0, *cuts, num_layers)
        yield [LayerRange(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_stage_bytes_sum_to_the_whole_model(tiny_root, name):
    model_dir = make_tiny_model(tiny_root, name)
    tensors = actual_tensors(model_dir)
    profile = ModelProfile.from_model_dir(model_dir)
    on_disk = sum(t.nbytes for t in tensors.values())  # a tied head is stored once
    assert profile.total_weight_bytes == on_disk
    for n in range(1, profile.num_layers + 1):
        for ranges in splits(profile.num_layers, n):
            total = sum(
                profile.stage_weight_bytes(r, i == 0, i == n - 1) for i, r in enumerate(ranges)
            )
            # With several stages the last holds its own copy of a tied head.
            extra = profile.head_bytes if profile.tied and n > 1 else 0
            assert total == on_disk + extra


@pytest.mark.parametrize("name", ["odd_layers_tied", "gqa", "attention_bias"])
def test_stage_bytes_match_what_a_stage_loads(tiny_root, name):
    model_dir = make_tiny_model(tiny_root, name)
    profile = ModelProfile.from_model_dir(model_dir)
    args = LlamaArgs.from_config(config(model_dir))
    num = profile.num_layers
    for r in [LayerRange(0, num), LayerRange(0, 1), LayerRange(1, num), LayerRange(1, num - 1)]:
        if len(r) == 0:
            continue
        loaded = load_range(model_dir, args, r.start, r.end, torch.float32, torch.device("cpu"))
        assert profile.stage_weight_bytes(r, r.start == 0, r.end == num) == weight_bytes(loaded)


def test_stage_flops_count_the_head_on_the_last_stage_only():
    profile = ModelProfile(
        num_layers=3,
        layer_bytes=(10, 20, 30),
        embed_bytes=100,
        norm_bytes=1,
        head_bytes=100,
        tied=True,
        layer_flops_decode=(1.0, 2.0, 4.0),
        layer_flops_prefill=(1.0, 2.0, 4.0),
        head_flops=1000.0,
        kv_bytes_per_token_per_layer=8,
    )
    assert profile.stage_flops(LayerRange(0, 2), True, False) == 3.0  # embeddings: no FLOPs
    assert profile.stage_flops(LayerRange(2, 3), False, True) == 1004.0
    assert profile.stage_weight_bytes(LayerRange(0, 3), True, True) == 60 + 100 + 1
    assert profile.stage_weight_bytes(LayerRange(2, 3), False, True) == 30 + 1 + 100
    assert profile.stage_weight_bytes(LayerRange(0, 1), True, False) == 10 + 100


def test_profile_and_capacity_refuse_inconsistent_numbers():
    with pytest.raises(InvalidArgument, match="layer_bytes has 2 entries"):
        ModelProfile(3, (1, 2), 1, 1, 1, False, (1.0,) * 3, (1.0,) * 3, 1.0, 1)
    with pytest.raises(InvalidArgument, match="h:1.*positive"):
        StageCapacity("h:1", "cpu", 10, 0, 0.0)
    with pytest.raises(InvalidArgument, match="h:1"):
        StageCapacity("h:1", "cpu", -1, 0, 1.0)


def test_the_planner_imports_no_torch_and_no_grpc():
    code = (
        "import sys, orchestrator.strategies, orchestrator.profile; "
        "bad = [m for m in ('torch', 'grpc') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
