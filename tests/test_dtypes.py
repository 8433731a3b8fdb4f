"""`--dtype bfloat16` and `--dtype float16` stages on CPU, on the general path, on the
static-slot decode path (`--static-kv on`) and in the batch-invariant mode, against
transformers' LlamaForCausalLM loaded in the same dtype: a 2-stage mesh generates transformers'
greedy tokens up to near-ties (README: what 'identical' means), with its log-probabilities within
a tolerance stated per dtype, and holds the weights at 2 bytes per parameter; the last stage's
logits over a whole sequence are within that tolerance for every tiny model.

Two implementations of the same math in a 16-bit dtype round differently, and which kernels
round how depends on the CPU (AVX-512 BF16 and AMX kernels round a row differently when the step
holds other rows): a token may differ from transformers' where its top two log-probabilities lie
within the dtype's rounding of each other. So the check is teacher-forced on our tokens: after
the same prefix, each of our tokens is transformers' greedy choice or within NEAR_TIE of it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from client.client import ClientError
from orchestrator.profile import ModelProfile
from protos.sampling import Sampling
from protos.shared.layer_range import LayerRange
from stage_service.config import StageConfig
from stage_service.stage import Stage, StepInput
from tests.conftest import TINY_CONFIGS, in_process_mesh, make_tiny_model

DTYPES = ("bfloat16", "float16")
NEW_TOKENS = 32
# Two implementations of the same math in a 16-bit dtype round differently. With the tiny
# models' logits under 4 in magnitude these bounds are about 6 units in the last place (bf16:
# 2^-6 between 2 and 4, fp16: 2^-9) and about twice the largest difference measured over the
# five tiny models (bf16 0.055, fp16 0.0062); transformers itself in that dtype is as far from
# its own float32 logits (bf16 0.057, fp16 0.0037).
ATOL = {"bfloat16": 0.1, "float16": 0.0125}
NEAR_TIE = {dtype: 2 * atol for dtype, atol in ATOL.items()}  # a log-probability gap


def hf_model(model_dir: Path, dtype: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()


def hf_greedy(model: LlamaForCausalLM, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' generate, greedy, never stopping at end-of-sequence."""
    config = model.generation_config
    config.eos_token_id, config.pad_token_id = None, 0
    config.max_new_tokens, config.do_sample = new_tokens, False
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


def assert_greedy_up_to_near_ties(
    model: LlamaForCausalLM, prompt: list[int], reply, dtype: str
) -> None:
    """Each of the reply's tokens is transformers' greedy choice after the same prefix (the
    prompt and the reply's tokens before it), or within NEAR_TIE of it in log-probability; the
    reply's log-probabilities are within ATOL of transformers' for those tokens."""
    tokens = reply.token_ids
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, -1)
    ours = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    best, choice = logprobs.max(-1)
    gap = best - ours
    far = [(i, tokens[i], int(choice[i]), float(gap[i])) for i in range(len(tokens))]
    far = [f for f in far if f[3] > NEAR_TIE[dtype]]
    assert not far, f"(position, our token, transformers', log-probability gap): {far}"
    torch.testing.assert_close(torch.tensor(reply.logprobs), ours, atol=ATOL[dtype], rtol=0)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("dtypes"), "gqa")


@pytest.mark.parametrize("mode", ["general", "static", "batch-invariant"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_mesh_in_a_16_bit_dtype_generates_what_transformers_does(gqa, dtype, mode):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (12, 5)]
    model = hf_model(gqa, dtype)
    static_kv = "on" if mode == "static" else "off"
    options = dict(dtype=dtype, static_kv=static_kv, max_context=64, allow_slow_dtype=True)
    options["batch_invariant"] = "on" if mode == "batch-invariant" else "off"
    results: dict[int, object] = {}
    with in_process_mesh(gqa, 2, stage_options=options) as mesh:

        def run(i: int) -> None:  # at once: on static slots the decode steps share a batch
            try:
                results[i] = mesh.client.generate(token_ids=prompts[i], max_new_tokens=NEW_TOKENS)
            except ClientError as err:  # reported by the assertion below
                results[i] = err

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        infos = [stage.info() for stage in mesh.stages]
        decoders = [stage.loaded.decoder for stage in mesh.stages]
    replies = [results[i] for i in range(len(prompts))]
    assert not [r for r in replies if isinstance(r, ClientError)], replies
    for prompt, reply in zip(prompts, replies, strict=True):
        assert len(reply.token_ids) == NEW_TOKENS
        assert_greedy_up_to_near_ties(model, prompt, reply, dtype)
    assert all((d is not None) == (mode == "static") for d in decoders)
    # The weights really are held at 2 bytes per parameter (the profile at dtype_bytes=2).
    profile = ModelProfile.from_model_dir(gqa, dtype_bytes=2)
    for i, info in enumerate(infos):
        layers = LayerRange(info["layer_start"], info["layer_end"])
        assert info["dtype"] == dtype
        assert info["weight_bytes"] == profile.stage_weight_bytes(layers, i == 0, i == 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_last_stage_logits_in_a_16_bit_dtype_are_within_the_tolerance(tiny_root, name, dtype):
    """Every row's logits over a prompt and transformers' greedy continuation, from a stage that
    holds the whole model (the general path; the decode path is checked above)."""
    model_dir = make_tiny_model(tiny_root, name)
    prompt = torch.randint(0, 101, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    model = hf_model(model_dir, dtype)
    sequence = prompt + hf_greedy(model, prompt, NEW_TOKENS)
    with torch.inference_mode():
        want = model(torch.tensor([sequence])).logits[0].float()
    stage = Stage(
        StageConfig(model=str(model_dir), kv_cache_mb=16, dtype=dtype, allow_slow_dtype=True)
    )
    try:
        stage.load_layers(0, stage.args.num_layers, 1)
        step = StepInput("s", 1, 0, sequence, None, Sampling(), return_logits=True)
        got = stage.run_step(step).logits
    finally:
        stage.batcher.close()
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_cpu_without_half_instructions_refuses_the_slow_dtype(gqa, dtype):
    from protos.errors import FailedPrecondition
    from stage_service import cpu_kernels
    from stage_service.device_checks import HALF_INSTRUCTIONS

    if set(HALF_INSTRUCTIONS[getattr(torch, dtype)]) & cpu_kernels.cpu_flags():
        pytest.skip(f"this CPU has instructions for {dtype}: it is not refused here")
    with pytest.raises(FailedPrecondition, match="slower than float32.*--allow-slow-dtype"):
        Stage(StageConfig(model=str(gqa), kv_cache_mb=16, dtype=dtype, batch_invariant="off"))
    # the batch-invariant mode's kernels read 16-bit weights themselves: not refused
    Stage(
        StageConfig(model=str(gqa), kv_cache_mb=16, dtype=dtype, batch_invariant="on")
    ).batcher.close()


def test_int8_on_a_gpu_is_refused_unless_allowed(gqa):
    """The check itself (this machine has no GPU): int8 on CUDA is refused with what pays."""
    from protos.errors import FailedPrecondition
    from stage_service.device_checks import check_cuda_quantize

    cuda = torch.device("cuda")
    with pytest.raises(FailedPrecondition, match="int4.*--allow-slow-dtype"):
        check_cuda_quantize(StageConfig(model=str(gqa), device="cuda", quantize="int8"), cuda)
    allowed = StageConfig(model=str(gqa), device="cuda", quantize="int8", allow_slow_dtype=True)
    check_cuda_quantize(allowed, cuda)
    check_cuda_quantize(StageConfig(model=str(gqa), device="cuda", quantize="int4"), cuda)
    check_cuda_quantize(StageConfig(model=str(gqa), quantize="int8"), torch.device("cpu"))
