"""What a stage's Info reports (llamadist.proto's StageInfo, as a dict of its fields): the
device and its memory, the weights' format, the range in force and its KV cache. The
orchestrator plans from it; the stage's metrics read it too."""

from __future__ import annotations

import psutil
import torch

from stage_service import cpu_kernels
from stage_service.range_holder import RangeHolder


def stage_info(holder: RangeHolder) -> dict:
    loaded = holder.loaded
    config = holder.config
    if holder.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(holder.device)
    else:
        vm = psutil.virtual_memory()
        free, total = vm.available, vm.total
    out = {
        "device": str(holder.device),
        "dtype": str(holder.dtype).removeprefix("torch."),
        "quantize": weight_format(holder),
        "quant_kernel": quant_kernel(holder),
        "held_layer_start": holder.held.layers.start,
        "held_layer_end": holder.held.layers.end,
        "fetches_weights": holder.shipped is not None,
        "weights_source": holder.weights_source if loaded is not None else "",
        "num_layers": holder.args.num_layers if holder.args is not None else 0,
        "kv_budget_bytes": config.kv_cache_mb * 2**20,
        "memory_total_bytes": total,
        "memory_free_bytes": free,
        "model_fingerprint": holder.fingerprint,
        "threads": torch.get_num_threads(),
        "gflops": holder.gflops,
        "max_context": holder.max_context,
        "plan_epoch": holder.epoch,
        "batch_invariant": config.use_batch_invariant,
    }
    if loaded is not None:
        loaded.cache.sweep()
        w = loaded.model.weights
        out |= {
            "layer_start": w.span.start,
            "layer_end": w.span.end,
            "has_embeddings": w.is_first,
            "has_head": w.is_last,
            "weight_bytes": loaded.weight_bytes,
            "kv_used_bytes": loaded.cache.used_bytes,
            "kv_bytes_per_token": loaded.cache.shape.bytes_per_token,
            "active_sessions": len(loaded.cache),
        }
    return out


def weight_format(holder: RangeHolder) -> str:
    """none, or <int8|int4>-g<group>, with -float-head where the embedding and head stay in
    the stage's dtype (orchestrator/profile.py counts the bytes from it)."""
    fmt = holder.config.weight_format
    return fmt if fmt == "none" or holder.rows_quantized else f"{fmt}-float-head"


def quant_kernel(holder: RangeHolder) -> str:
    """What computes the quantized matmuls here ('' unquantized)."""
    quantize = holder.config.quantize
    if quantize == "none":
        return ""
    if holder.device.type != "cpu":
        if quantize == "int4":
            return "tinygemm (torch._weight_int4pack_mm) where shapes allow, else torch"
        return "torch, dequantized per call (slower than bf16: no int8 kernel here)"
    kernels, why = cpu_kernels.load()
    return why if kernels is not None else f"torch ({why})"
