"""Quantized stages (--quantize int8|int4) compute what the quantized model means: greedy ids
through 2- and 3-stage meshes equal transformers' LlamaForCausalLM run on the dequantized
weights (written to a tmp safetensors directory by tests/dequantize.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stage_service import cpu_kernels
from stage_service.quant import Int4Weight, Int8Weight
from stage_service.weights import Quantization
from tests.conftest import TINY_CONFIGS, in_process_mesh, make_tiny_model, reference_greedy
from tests.dequantize import write_dequantized

NEW_TOKENS = 24
# int8 at its default group (64: tiny matrices of 48 inputs are one partial group); int4 at 32.
SETTINGS = {"int8": dict(quantize="int8"), "int4": dict(quantize="int4", quant_group=32)}
FORMATS = {"int8": "int8-g64", "int4": "int4-g32"}


def dequantized(model_dir, tmp_path, setting: str):
    out = tmp_path / f"dequantized-{setting}"
    mode, group = FORMATS[setting].split("-g")
    write_dequantized(model_dir, out, Quantization(mode, int(group)))
    return out


def test_the_kernels_are_built_here():
    """CI's machine has a C compiler and AVX2: the fast path, not the fallback, is tested."""
    kernels, why = cpu_kernels.load()
    assert kernels is not None, why


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17, 31, 32, 40])
@pytest.mark.parametrize("shape", [(101, 48), (7, 64), (200, 96), (64, 160)])
def test_kernels_equal_float_matmul_on_dequantized_weights(shape, rows):
    """Every path of the kernels (each side of many_rows, channel tails, the blocked path,
    partial int4 groups) against F.linear on the dequantized matrix, up to float32 sums of up
    to 160 unit-sized products in another order (the kernels chain each group's products in
    input order; torch splits its sums its own way)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=g)
    bias = torch.randn(shape[0], generator=g)
    x = torch.randn(rows, shape[1], generator=g)
    matrices = [Int8Weight.quantize(w), Int8Weight.quantize(w, 16), Int8Weight.quantize(w, 32)]
    matrices += [Int4Weight.quantize(w, 32), Int4Weight.quantize(w, 64)]
    for q in matrices:
        expected = F.linear(x, q.dequantize(), bias)
        torch.testing.assert_close(q.linear(x, bias), expected, rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(q.linear(x, None), expected - bias, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("group", [16, 64, 256, 512])
def test_rows_together_equal_rows_one_at_a_time_exactly(group):
    """int8, several rows (a verify step): each weight is converted once for a pair of rows, and
    every row's output is bit for bit what it is alone, so a token's logits do not depend on
    how many drafts travel with it."""
    g = torch.Generator().manual_seed(group)
    w = torch.randn(203, 512, generator=g)
    x = torch.randn(9, 512, generator=g)
    q = Int8Weight.quantize(w, group)
    kernels = cpu_kernels.load()[0]
    together = torch.empty(9, 203)
    kernels.q8_linear(x, q.data, q.group, q.scale, None, together)
    for i in range(9):
        alone = torch.empty(1, 203)
        kernels.q8_linear(x[i : i + 1].contiguous(), q.data, q.group, q.scale, None, alone)
        assert torch.equal(together[i], alone[0]), i


def test_quantization_error_is_bounded_by_its_step():
    """Each dequantized weight is within half a quantization step of the original."""
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    q8 = Int8Weight.quantize(w)
    step8 = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q8.dequantize() - w).abs() <= step8 / 2 + 1e-6).all()
    q8g = Int8Weight.quantize(w, 32)
    step8g = w.view(48, 3, 32).abs().amax(-1, keepdim=True) / 127
    assert ((q8g.dequantize().view(48, 3, 32) - w.view(48, 3, 32)).abs() <= step8g / 2 + 1e-6).all()
    q4 = Int4Weight.quantize(w, 32)
    groups = w.view(48, 3, 32)
    step4 = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    assert ((q4.dequantize().view(48, 3, 32) - groups).abs() <= step4 / 2 + 1e-5).all()
    ids = torch.tensor([0, 47, 45, 3])
    for q in (q8, q8g):
        assert torch.equal(q.embedding(ids, torch.float32), q.dequantize()[ids])


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_models_generate_as_transformers_on_dequantized_weights(
    tiny_root, tmp_path, name, setting, num_stages
):
    model_dir = make_tiny_model(tiny_root, name)
    options = SETTINGS[setting]
    prompt = torch.randint(0, 101, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = reference_greedy(dequantized(model_dir, tmp_path, setting), prompt, NEW_TOKENS)
    with in_process_mesh(model_dir, num_stages, stage_options=options) as mesh:
        result = mesh.client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS)
        infos = [stage.info() for stage in mesh.stages]
        plan = mesh.client.plan()
    assert result.token_ids == expected
    assert {info["quantize"] for info in infos} == {FORMATS[setting]}
    # the C kernels' instruction set, the best this CPU has
    best = "avx512" if "avx512f" in cpu_kernels.cpu_flags() else "avx2"
    assert {info["quant_kernel"] for info in infos} == {best}
    assert {s["quantize"] for s in plan["stages"]} == {infos[0]["quantize"]}
    # The planner counts the packed bytes each stage really holds.
    assert [int(s["weight_bytes"]) for s in plan["stages"]] == [i["weight_bytes"] for i in infos]


@pytest.mark.slow
@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_default_model_generates_as_transformers_on_dequantized_weights(
    default_model, tmp_path, setting, num_stages
):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(default_model))("The history of the Roman Empire")
    ids = ids["input_ids"]
    expected = reference_greedy(dequantized(default_model, tmp_path, setting), ids, NEW_TOKENS)
    with in_process_mesh(default_model, num_stages, stage_options=SETTINGS[setting]) as mesh:
        result = mesh.client.generate(token_ids=ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert result.token_ids == expected


@pytest.mark.slow
def test_default_model_perplexity_costs_of_quantization(default_model):
    """On the fixed ~2,900-token text: int8 within 1% of float32's perplexity, int4 within 5%.
    (The default model comes from a Q4_1 GGUF, so int4 with groups of 32 recovers its layer
    weights exactly: int4's cost here is its int8 head's.)"""
    from pathlib import Path

    from transformers import AutoTokenizer

    from stage_service.perplexity import perplexity

    text = (Path(__file__).parent / "data" / "declaration.txt").read_text()
    ids = AutoTokenizer.from_pretrained(str(default_model))(text)["input_ids"]
    assert len(ids) >= 2000
    base = perplexity(default_model, ids, Quantization("none"))
    int8 = perplexity(default_model, ids, Quantization("int8", 64))
    int4 = perplexity(default_model, ids, Quantization("int4", 32))
    assert base < 100  # a real model on English text, not noise
    assert int8 <= base * 1.01, (base, int8)
    assert int4 <= base * 1.05, (base, int4)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_fused_layer_equals_the_torch_path(tiny_root, name, setting, rows):
    """A quantized CPU range runs a step of one session and few rows (a decode token, or a
    token and the drafts of a verify step) with one C call per layer (fused_layers.py); its
    hidden states and cache equal the torch path's on the same weights, cache and positions."""
    from protos.shared.model_files import LlamaArgs, read_config
    from stage_service.fused_layers import range_model
    from stage_service.model import Segment
    from stage_service.weights import load_range

    model_dir = make_tiny_model(tiny_root, name)
    args = LlamaArgs.from_config(read_config(model_dir))
    mode, group = FORMATS[setting].split("-g")
    cpu = torch.device("cpu")
    weights = load_range(model_dir, args, 0, 2, torch.float32, cpu, Quantization(mode, int(group)))
    model = range_model(args, weights, cpu)
    fused_path = model.fused
    assert fused_path is not None and rows <= fused_path.MAX_ROWS
    shape = (args.num_kv_heads, 32, args.head_dim)
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(2)]
    prompt = torch.tensor([5, 17, 3, 99, 42, 7, 8, 61, 2, 30])
    model.fused = None
    model.run([Segment(slice(0, 10), 0, kv)], prompt, None)  # the torch path
    twin = [(k.clone(), v.clone()) for k, v in kv]
    step = torch.tensor([11, 4, 9, 60, 1, 13, 21, 8][:rows])
    eager = model.run([Segment(slice(0, rows), 10, twin)], step, None, True)
    model.fused = fused_path
    fused = model.run([Segment(slice(0, rows), 10, kv)], step, None, True)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    for (k, v), (k2, v2) in zip(kv, twin, strict=True):
        torch.testing.assert_close(k, k2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_static_kv_decode_path_with_quantized_weights(tiny_root, tmp_path, setting):
    """The GPU layout (static slots, fixed-shape decode step, eager on CPU) over quantized
    matrices: a later stage's input buffer takes the activations' dtype, not a matrix's."""
    model_dir = make_tiny_model(tiny_root, "gqa")
    prompt = torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = reference_greedy(dequantized(model_dir, tmp_path, setting), prompt, NEW_TOKENS)
    options = dict(SETTINGS[setting], static_kv="on", max_context=64, batch_invariant="off")
    with in_process_mesh(model_dir, 2, stage_options=options) as mesh:
        result = mesh.client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected


@pytest.mark.parametrize(
    "fmt", ["int8-g64", "int4-g32", "int8-g16-float-head", "int4-g64-float-head"]
)
def test_the_planner_counts_the_bytes_a_stage_holds(tiny_root, fmt):
    """orchestrator/profile.py's packed sizes, per format (the GPU's -float-head included),
    equal what weights.load_range holds, for a first, a middle and a last range."""
    from orchestrator.profile import ModelProfile
    from protos.shared.layer_range import LayerRange
    from protos.shared.model_files import LlamaArgs, read_config
    from stage_service.weights import load_range, weight_bytes

    model_dir = make_tiny_model(tiny_root, "untied_mha")
    args = LlamaArgs.from_config(read_config(model_dir))
    profile = ModelProfile.from_model_dir(model_dir, 4, weight_format=fmt)
    mode, _, rest = fmt.partition("-g")
    quant = Quantization(mode, int(rest.split("-")[0]), rows_too=not fmt.endswith("-float-head"))
    for start, end in [(0, 2), (2, 4), (4, 6)]:
        held = load_range(model_dir, args, start, end, torch.float32, torch.device("cpu"), quant)
        first, last = start == 0, end == args.num_layers
        planned = profile.stage_weight_bytes(LayerRange(start, end), first, last)
        assert planned == weight_bytes(held), (start, end)
