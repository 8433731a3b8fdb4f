"""Quantized stages (--quantize int8|int4) compute what the quantized model means: greedy ids
through 2- and 3-stage meshes equal transformers' LlamaForCausalLM run on the dequantized
weights (written to a tmp safetensors directory by weights.write_dequantized)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stage_service import cpu_kernels
from stage_service.quant import Int4Weight, Int8Weight
from stage_service.weights import Quantization, write_dequantized
from tests.conftest import TINY_CONFIGS, in_process_mesh, make_tiny_model, reference_greedy

NEW_TOKENS = 24
SETTINGS = {"int8": dict(quantize="int8"), "int4": dict(quantize="int4", quant_group=32)}


def dequantized(model_dir, tmp_path, options: dict):
    out = tmp_path / f"dequantized-{options['quantize']}"
    write_dequantized(
        model_dir, out, Quantization(options["quantize"], options.get("quant_group", 32))
    )
    return out


def test_the_kernels_are_built_here():
    """CI's machine has a C compiler and AVX2: the fast path, not the fallback, is tested."""
    kernels, why = cpu_kernels.load()
    assert kernels is not None, why


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 31, 32, 40])
@pytest.mark.parametrize("shape", [(101, 48), (7, 64), (200, 96), (64, 160)])
def test_kernels_equal_float_matmul_on_dequantized_weights(shape, rows):
    """Every path of the kernels (1-3 rows, channel tails, the blocked path for many rows,
    partial int4 groups) against F.linear on the dequantized matrix."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=g)
    bias = torch.randn(shape[0], generator=g)
    x = torch.randn(rows, shape[1], generator=g)
    for q in (Int8Weight.quantize(w), Int4Weight.quantize(w, 32), Int4Weight.quantize(w, 64)):
        expected = F.linear(x, q.dequantize(), bias)
        torch.testing.assert_close(q.linear(x, bias), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q.linear(x, None), expected - bias, rtol=1e-5, atol=1e-5)


def test_quantization_error_is_bounded_by_its_step():
    """Each dequantized weight is within half a quantization step of the original."""
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    q8 = Int8Weight.quantize(w)
    step8 = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q8.dequantize() - w).abs() <= step8 / 2 + 1e-6).all()
    q4 = Int4Weight.quantize(w, 32)
    groups = w.view(48, 3, 32)
    step4 = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    assert ((q4.dequantize().view(48, 3, 32) - groups).abs() <= step4 / 2 + 1e-5).all()
    ids = torch.tensor([0, 47, 45, 3])
    assert torch.equal(q8.embedding(ids, torch.float32), q8.dequantize()[ids])


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_models_generate_as_transformers_on_dequantized_weights(
    tiny_root, tmp_path, name, setting, num_stages
):
    model_dir = make_tiny_model(tiny_root, name)
    options = SETTINGS[setting]
    prompt = torch.randint(0, 101, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = reference_greedy(dequantized(model_dir, tmp_path, options), prompt, NEW_TOKENS)
    with in_process_mesh(model_dir, num_stages, stage_options=options) as mesh:
        result = mesh.client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS)
        infos = [stage.info() for stage in mesh.stages]
        plan = mesh.client.plan()
    assert result.token_ids == expected
    assert {info["quantize"] for info in infos} == {"int8" if setting == "int8" else "int4-g32"}
    assert {s["quantize"] for s in plan["stages"]} == {infos[0]["quantize"]}
    # The planner counts the packed bytes each stage really holds.
    assert [int(s["weight_bytes"]) for s in plan["stages"]] == [i["weight_bytes"] for i in infos]
