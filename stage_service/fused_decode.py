"""Batch-1 decode of a CPU range with quantized matrices: one C call per layer (kernels/layer.c)
instead of ~40 eager torch ops. At one token, dispatching those ops took longer than the int8
matmuls themselves (bench/CPU_NOTES.md). Used by RangeModel.forward for a step of one session
and at most MAX_ROWS rows (a decode token, or a token and the drafts a speculative step
verifies: the weights are read once for all of them); every other step (prefill, batches of
sessions) runs the torch path, whose matmuls are the same kernels."""

from __future__ import annotations

import torch

from protos.model_files import LlamaArgs
from stage_service import cpu_kernels
from stage_service.model import RangeWeights, Segment
from stage_service.quant import Int4Weight, Int8Weight


def _qmat(w, bias: torch.Tensor | None, keep: list) -> cpu_kernels.QMat:
    if bias is not None:
        bias = bias.float().contiguous()
        keep.append(bias)
    four = isinstance(w, Int4Weight)
    n, k = w.shape
    return cpu_kernels.QMat(
        bits=4 if four else 8, n=n, k=k, group=w.group, data=w.data.data_ptr(),
        scale=w.scale.data_ptr(), mins=w.minimum.data_ptr() if four else None,
        bias=bias.data_ptr() if bias is not None else None,
    )  # fmt: skip


class FusedDecode:
    MAX_ROWS = 8  # rows of one session per call; from here on the torch path is as fast

    def __init__(self, args: LlamaArgs, weights: RangeWeights, kernels: cpu_kernels.Kernels):
        self.kernels = kernels
        self._keep: list[torch.Tensor] = []  # tensors the structs point into
        self.layers = []
        for w in weights.layers:
            self.layers.append(
                cpu_kernels.LayerArgs(
                    hidden=args.hidden_size,
                    heads=args.num_heads,
                    kv_heads=args.num_kv_heads,
                    head_dim=args.head_dim,
                    inter=args.intermediate_size,
                    eps=args.rms_norm_eps,
                    norm1=w.input_norm.data_ptr(),
                    norm2=w.post_norm.data_ptr(),
                    qkv=_qmat(w.wqkv, w.bqkv, self._keep),
                    o=_qmat(w.wo, w.bo, self._keep),
                    gate_up=_qmat(w.w_gate_up, w.b_gate_up, self._keep),
                    down=_qmat(w.w_down, w.b_down, self._keep),
                )  # fmt: skip
            )
        a = args
        qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
        self.row_scratch = (
            a.hidden_size + qkv + a.num_heads * a.head_dim + 2 * a.intermediate_size
            + max(a.hidden_size, a.intermediate_size) // 16
        )  # fmt: skip
        self.scratch = torch.empty(self.row_scratch + 1024)

    @classmethod
    def build(cls, args: LlamaArgs, weights: RangeWeights, device: torch.device):
        """The fused path where it applies (a CPU range in float32 whose matrices are all
        quantized, the kernels built), else None."""
        if device.type != "cpu" or weights.layers[0].input_norm.dtype != torch.float32:
            return None
        kernels, _ = cpu_kernels.load()
        quantized = (Int8Weight, Int4Weight)
        matrices = [m for w in weights.layers for m in (w.wqkv, w.wo, w.w_gate_up, w.w_down)]
        if kernels is None or not all(isinstance(m, quantized) for m in matrices):
            return None
        return cls(args, weights, kernels)

    def run(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segment: Segment
    ) -> torch.Tensor:
        """x: [M, hidden] float32, M consecutive tokens from segment.start_pos (M = 1, or a
        token and its drafts); returns the range's output."""
        x = x.float().contiguous().clone()  # updated in place
        cos, sin = cos.contiguous(), sin.contiguous()
        pos, rows = segment.start_pos, x.shape[0]
        need = rows * self.row_scratch + pos + rows + 16
        if self.scratch.numel() < need:
            self.scratch = torch.empty(2 * need)
        for layer, (k, v) in zip(self.layers, segment.kv, strict=False):
            assert k.is_contiguous() and v.is_contiguous() and k.shape[1] >= pos + rows
            self.kernels.decode_layer(
                layer, x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), k.data_ptr(),
                v.data_ptr(), k.shape[1], pos, self.scratch.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        return x
