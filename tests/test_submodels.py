"""Per-stage submodels (`llamadist model split`): each stage directory holds only its layers'
tensors; stages started on them generate exactly what transformers generates on the full
model; a plan that gives a stage layers it lacks is refused naming the stage and the layers; a
submodel whose files do not match its config, or that changed, is refused at start."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from client.client import ClientError
from client.commands_model import split_ranges
from protos.errors import FailedPrecondition
from protos.shared.layer_range import LayerRange
from protos.shared.model_files import TensorIndex, model_fingerprint
from protos.shared.submodel import held, split
from stage_service.config import StageConfig
from stage_service.stage import Stage
from tests.conftest import TINY_CONFIGS, in_process_mesh, make_tiny_model, reference_greedy

NEW_TOKENS = 16


@pytest.mark.parametrize("boundaries", ["0-1,2-3", "0-0,1-1,2-3"])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_stages_on_submodels_generate_as_transformers(tiny_root, tmp_path, name, boundaries):
    model_dir = make_tiny_model(tiny_root, name)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    if layers != 4:  # give the last range the rest of the model's layers
        boundaries = boundaries.rsplit(",", 1)[0] + f",{int(boundaries[-3])}-{layers - 1}"
    ranges = split_ranges(model_dir, 0, "", "", boundaries)
    dirs = split(model_dir, tmp_path / "split", ranges)
    full = TensorIndex(model_dir)
    for d, (start, end) in zip(dirs, ranges, strict=True):
        h = held(d)
        assert (h.layers, h.fingerprint) == (LayerRange(start, end), model_fingerprint(model_dir))
        own = set(TensorIndex(d).shapes)
        layer_of = {int(n.split(".")[2]) for n in own if n.startswith("model.layers.")}
        assert layer_of == set(range(start, end)) and own <= set(full.shapes)
    prompt = torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = reference_greedy(model_dir, prompt, NEW_TOKENS)
    with in_process_mesh(
        model_dir, len(dirs), stage_models=dirs, strategy="custom", boundaries=boundaries
    ) as mesh:
        result = mesh.client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS)
        infos = [stage.info() for stage in mesh.stages]
        with pytest.raises(ClientError) as err:  # all layers on stage 0, which holds a few
            mesh.client.preview_plan(
                strategy="custom", boundaries=f"0-{layers - 1}", num_partitions=1
            )
    assert result.token_ids == expected
    assert [(i["held_layer_start"], i["held_layer_end"]) for i in infos] == ranges
    assert err.value.code == "FAILED_PRECONDITION"
    assert "stage 0" in err.value.message and "would need layers" in err.value.message


def test_a_stage_refuses_layers_its_submodel_lacks(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    second = split(model_dir, tmp_path / "split", [(0, 2), (2, 4)])[1]
    stage = Stage(StageConfig(model=str(second), kv_cache_mb=16))
    with pytest.raises(FailedPrecondition, match=r"holds layers 2-3 only.*lacks layers 1"):
        stage.load_layers(1, 4, epoch=1)
    stage.load_layers(2, 4, epoch=1)  # what it holds: fine
    assert stage.info()["layer_start"] == 2


def test_a_changed_or_mismatched_submodel_is_refused(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    first, second = split(model_dir, tmp_path / "split", [(0, 2), (2, 4)])
    tensors = load_file(str(first / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight"] += 1.0  # other weights, same names
    save_file(tensors, str(first / "model.safetensors"))
    with pytest.raises(FailedPrecondition, match="files changed since"):
        held(first)
    tensors = load_file(str(second / "model.safetensors"))
    del tensors["model.layers.3.self_attn.o_proj.weight"]
    save_file(tensors, str(second / "model.safetensors"))
    with pytest.raises(FailedPrecondition, match="do not match its config.*o_proj"):
        Stage(StageConfig(model=str(second), kv_cache_mb=16))


def test_another_models_submodel_is_refused_by_the_orchestrator(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    other = make_tiny_model(tmp_path / "other", "gqa", seed=1)
    mine = split(model_dir, tmp_path / "mine", [(0, 2), (2, 4)])[0]
    theirs = split(other, tmp_path / "theirs", [(0, 2), (2, 4)])[1]
    refused = r"stage 1 .* serves model \w+, the orchestrator"
    with (
        pytest.raises(ClientError, match=refused) as err,
        in_process_mesh(
            model_dir, 2, stage_models=[mine, theirs], strategy="custom", boundaries="0-1,2-3"
        ) as mesh,
    ):
        mesh.client.generate(token_ids=[1, 2, 3], max_new_tokens=2)
    assert err.value.code == "UNAVAILABLE" and "same --model" in err.value.message


@pytest.mark.slow
@pytest.mark.parametrize("boundaries", ["0-14,15-29", "0-9,10-19,20-29"])
def test_default_model_on_submodels_generates_as_transformers(default_model, tmp_path, boundaries):
    from transformers import AutoTokenizer

    ranges = split_ranges(default_model, 0, "", "", boundaries)
    dirs = split(default_model, tmp_path / "split", ranges)
    ids = AutoTokenizer.from_pretrained(str(default_model))("The history of the Roman Empire")
    ids = ids["input_ids"]
    expected = reference_greedy(default_model, ids, NEW_TOKENS)
    with in_process_mesh(
        default_model, len(dirs), stage_models=dirs, strategy="custom", boundaries=boundaries
    ) as mesh:
        result = mesh.client.generate(token_ids=ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert result.token_ids == expected


def test_a_plan_on_fewer_positions_than_stages_is_checked_on_those(tiny_root, tmp_path):
    """num_partitions below the stages given: the held-layers check covers the positions the
    plan uses (found by the fuzz test: it compared the plan with every position)."""
    model_dir = make_tiny_model(tiny_root, "gqa")
    dirs = split(model_dir, tmp_path / "split", [(0, 2), (2, 4)])
    with in_process_mesh(
        model_dir, 3, stage_models=[*dirs, model_dir], strategy="custom", boundaries="0-1,2-3",
        plan_stages=2,
    ) as mesh:  # fmt: skip
        third = mesh.addresses[2]
        plan = mesh.client.preview_plan(strategy="uniform", num_partitions=1, stages=[third])
        assert [s["address"] for s in plan["stages"]] == [third]
        with pytest.raises(ClientError, match="stage 0 .* would need layers 2-3"):
            mesh.client.preview_plan(strategy="uniform", num_partitions=1)
