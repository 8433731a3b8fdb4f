"""What a stage refuses to run on its device because it would be far slower than the
alternative (each refusal names the flag that runs it anyway)."""

from __future__ import annotations

import torch

from protos.errors import FailedPrecondition
from stage_service import cpu_kernels
from stage_service.config import StageConfig

# CPU instructions that make a 16-bit dtype pay (any one of them).
HALF_INSTRUCTIONS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


def check_device(config: StageConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Every check below."""
    check_cpu_dtype(config, device, dtype)
    check_cuda_quantize(config, device)
    check_gpu_batch_invariant(config, device)


def check_cpu_dtype(config: StageConfig, device: torch.device, dtype: torch.dtype) -> None:
    """A 16-bit dtype on a CPU without instructions for it is refused: torch converts every
    weight to float32 and back there, 7x slower than float32 at 64 rows (bench/CPU_NOTES.md).
    The batch-invariant mode's C kernels read 16-bit weights themselves: nothing to refuse."""
    if device.type != "cpu" or dtype not in HALF_INSTRUCTIONS or config.allow_slow_dtype:
        return
    if config.use_batch_invariant:
        return
    needs = HALF_INSTRUCTIONS[dtype]
    if set(needs) & cpu_kernels.cpu_flags():
        return
    name = str(dtype).removeprefix("torch.")
    raise FailedPrecondition(
        f"--dtype {name} on this CPU is slower than float32 (it lacks {' and '.join(needs)}; "
        f"measured 7x slower at 64 rows on such a CPU): leave --dtype out for float32, use "
        f"--quantize int8 for fewer bytes, or pass --allow-slow-dtype to run it anyway"
    )


def check_cuda_quantize(config: StageConfig, device: torch.device) -> None:
    """int8 on CUDA has no kernel of its own: every matmul dequantizes its matrix first, which
    measured 5.8 tok/s against bf16's 120 on two H200s (bench/GPU_NOTES.md run 16). Refused
    unless --allow-slow-dtype, pointing at what pays there."""
    if device.type == "cuda" and config.quantize == "int8" and not config.allow_slow_dtype:
        raise FailedPrecondition(
            "--quantize int8 on a GPU dequantizes every matrix per call (measured 20x slower "
            "than bf16 on an H200): use --quantize int4 (tinygemm kernel) or none, or pass "
            "--allow-slow-dtype to run it anyway (it saves memory, not time)"
        )


def check_gpu_batch_invariant(config: StageConfig, device: torch.device) -> None:
    """The GPU batch-invariant kernels address each row's cache by its static slot."""
    if device.type == "cuda" and config.use_batch_invariant and not config.use_static_kv:
        raise FailedPrecondition(
            "--batch-invariant on a GPU keeps the KV in static slots: leave out --static-kv off"
        )
