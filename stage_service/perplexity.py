"""Perplexity of a model on a text, computed by the stage's own code (weights.load_range and
RangeModel, the kernels a quantized stage runs), the whole model as one range in this process.
What `python -m bench.mesh --quality` prints and the quality test checks: how much a weight format
(--quantize) costs against float32."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from protos.shared.model_files import LlamaArgs, read_config
from stage_service.fused_layers import range_model
from stage_service.model import Segment
from stage_service.weights import Quantization, load_range

CPU = torch.device("cpu")


def perplexity(model_dir: Path, ids: list[int], quant: Quantization, window: int = 1024) -> float:
    """exp(mean negative log-likelihood) of ids[1:], in windows of `window` tokens that each
    start with an empty cache (the first token of a window is context only)."""
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    args = LlamaArgs.from_config(read_config(model_dir))
    model = range_model(
        args, load_range(model_dir, args, 0, args.num_layers, torch.float32, CPU, quant), CPU
    )
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window + 1])
        n = len(chunk)
        shape = (args.num_kv_heads, n, args.head_dim)
        kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(args.num_layers)]
        logits = model.run([Segment(slice(0, n), 0, kv)], chunk, None, all_logits=True)
        nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
        count += n - 1
    return math.exp(nll / count)
