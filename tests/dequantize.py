"""What quantized stages compute, as a model directory transformers can run (test-only): the
tests compare a quantized stage's tokens with transformers' on this copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from stage_service.weights import Quantization, TensorSource


def write_dequantized(model_dir: Path, out: Path, quant: Quantization) -> None:
    """A copy of the model whose matrices are what `quant` makes of them, dequantized to
    float32: the model that quantized stages compute, for transformers to run (tests, quality).
    config.json and the tokenizer files are copied as they are."""
    source = TensorSource.of(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in source.names():
        (w,) = source.load([name], torch.float32, torch.device("cpu"))
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = quant.rows(name, w)
        elif name.startswith("model.layers.") and w.dim() == 2:
            w = quant.matrix(name, w)
        tensors[name] = w if isinstance(w, torch.Tensor) else w.dequantize()
    save_file(tensors, str(out / "model.safetensors"))
    for f in model_dir.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copy(f, out / f.name)
