"""A CPU range's layers and head as C calls (kernels/layer.c): one call per layer for all the
step's rows, instead of ~40 eager torch ops.

Two uses, decided at load (`FusedLayers.build`):
- **Speed** (the default mode): batch-1 decode and speculative verify steps (one session, at
  most MAX_ROWS rows) of a float32 range whose matrices are all quantized. At one token,
  dispatching the torch ops took longer than the int8 matmuls themselves (bench/CPU_NOTES.md);
  every other step runs the torch path.
- **Batch invariance** (`--batch-invariant`): every step, any dtype and weight format. A row's
  result then depends on nothing but its own input and its session's cache: not on how many
  rows share the step, their order, or whether they are prefill chunks, decode tokens or
  drafts (the kernels' sums are fixed per output; layer.c says how).
"""

from __future__ import annotations

import torch

from protos.errors import FailedPrecondition
from protos.shared.model_files import LlamaArgs
from stage_service import cpu_kernels
from stage_service.model import RangeModel, RangeWeights, Segment
from stage_service.packed import PackedFloat
from stage_service.quant import Int4Weight, Int8Weight

FLOAT_FORMATS = (torch.float32, torch.bfloat16, torch.float16)


def _qmat(w, bias: torch.Tensor | None, keep: list) -> cpu_kernels.QMat:
    """The struct layer.c reads for a matrix (pointers into tensors kept in `keep`)."""
    if bias is not None:
        bias = bias.float().contiguous()
        keep.append(bias)
    n, k = w.shape
    fields = dict(n=n, k=k, bias=bias.data_ptr() if bias is not None else None)
    if isinstance(w, PackedFloat):
        fmt = cpu_kernels.FORMATS[w.dtype]
        return cpu_kernels.QMat(format=fmt, group=0, data=w.data.data_ptr(), **fields)
    assert not isinstance(w, torch.Tensor), "float matrices go packed (pack_floats)"
    four = isinstance(w, Int4Weight)
    return cpu_kernels.QMat(
        format=cpu_kernels.FORMATS["int4" if four else "int8"], group=w.group,
        data=w.data.data_ptr(), scale=w.scale.data_ptr(),
        mins=w.minimum.data_ptr() if four else None, **fields,
    )  # fmt: skip


def _float32(t: torch.Tensor, keep: list) -> int:
    t = t.float().contiguous()
    keep.append(t)
    return t.data_ptr()


def _supported(w) -> bool:
    if isinstance(w, torch.Tensor):
        return w.dtype in FLOAT_FORMATS
    return isinstance(w, Int8Weight | Int4Weight | PackedFloat)


def _packed(w):
    """A float matrix packed for the C kernels (quantized and packed ones as they are)."""
    return PackedFloat.pack(w) if isinstance(w, torch.Tensor) else w


def pack_floats(weights: RangeWeights) -> None:
    """Replaces the range's float matrices by their packed form, in place: the C layers read
    that layout, and the torch path still runs on it (packed.py). A tied head stays one matrix
    with the embedding."""
    for w in weights.layers:
        w.wqkv, w.wo = _packed(w.wqkv), _packed(w.wo)
        w.w_gate_up, w.w_down = _packed(w.w_gate_up), _packed(w.w_down)
    if weights.head is not None:
        tied = weights.head is weights.embed
        weights.head = _packed(weights.head)
        if tied:
            weights.embed = weights.head


class FusedLayers:
    MAX_ROWS = 8  # speed use: rows of one session per call; from here on torch is as fast

    def __init__(
        self, args: LlamaArgs, weights: RangeWeights, kernels: cpu_kernels.Kernels, every_step: bool
    ):
        self.kernels = kernels
        self.every_step = every_step  # the batch-invariant use: all steps run here
        if every_step:
            pack_floats(weights)
        self.act = cpu_kernels.FORMATS[weights.layers[0].input_norm.dtype]
        self._keep: list[torch.Tensor] = []  # tensors the structs point into
        a = args
        self.layers = [
            cpu_kernels.LayerArgs(
                hidden=a.hidden_size,
                heads=a.num_heads,
                kv_heads=a.num_kv_heads,
                head_dim=a.head_dim,
                inter=a.intermediate_size,
                act=self.act,
                eps=a.rms_norm_eps,
                norm1=_float32(w.input_norm, self._keep),
                norm2=_float32(w.post_norm, self._keep),
                q_norm=_float32(w.q_norm, self._keep) if w.q_norm is not None else None,
                k_norm=_float32(w.k_norm, self._keep) if w.k_norm is not None else None,
                qkv=_qmat(w.wqkv, w.bqkv, self._keep),
                o=_qmat(w.wo, w.bo, self._keep),
                gate_up=_qmat(w.w_gate_up, w.b_gate_up, self._keep),
                down=_qmat(w.w_down, w.b_down, self._keep),
            )  # fmt: skip
            for w in weights.layers
        ]
        self.head = None
        if weights.is_last:
            self.final_norm = _float32(weights.final_norm, self._keep)
            self.head = _qmat(weights.head, None, self._keep)
        qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
        self.row_scratch = (
            a.hidden_size + qkv + a.num_heads * a.head_dim + 2 * a.intermediate_size
            + max(a.hidden_size, a.intermediate_size) // 16 + 1
        )  # fmt: skip
        self.hidden = a.hidden_size
        self.eps = a.rms_norm_eps
        self.scratch = torch.empty(self.row_scratch + 1024)

    @classmethod
    def build(
        cls, args: LlamaArgs, weights: RangeWeights, device: torch.device, batch_invariant: bool
    ) -> FusedLayers | None:
        """For every step with `batch_invariant` (refused where the kernels cannot run), else
        the speed use where it applies (a CPU range in float32 whose matrices are all
        quantized, the kernels built), else None."""
        if device.type != "cpu":
            return None
        kernels, why = cpu_kernels.load()
        matrices = [m for w in weights.layers for m in (w.wqkv, w.wo, w.w_gate_up, w.w_down)]
        if batch_invariant:
            if kernels is None:
                raise FailedPrecondition(
                    f"--batch-invariant on a CPU needs the C kernels, which cannot run here "
                    f"({why}): start the stage without --batch-invariant"
                )
            odd = [m for m in [*matrices, weights.head] if m is not None and not _supported(m)]
            if odd:
                raise FailedPrecondition(
                    f"--batch-invariant has no CPU kernel for a {type(odd[0]).__name__} matrix"
                )
            return cls(args, weights, kernels, every_step=True)
        if weights.layers[0].input_norm.dtype != torch.float32 or kernels is None:
            return None
        if not all(isinstance(m, Int8Weight | Int4Weight) for m in matrices):
            return None
        return cls(args, weights, kernels, every_step=False)

    def takes(self, segments: list[Segment], rows: int) -> bool:
        """Whether this step runs here (else on the torch path)."""
        return self.every_step or (len(segments) == 1 and rows <= self.MAX_ROWS)

    def _scratch(self, floats: int) -> torch.Tensor:
        if self.scratch.numel() < floats:
            self.scratch = torch.empty(2 * floats)
        return self.scratch

    def run(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment]
    ) -> torch.Tensor:
        """x: [N, hidden], the rows of the segments in order, each segment's rows consecutive
        positions from its start_pos; cos, sin: [N, 1, head_dim]. Returns the range's output
        [N, hidden] in float32 (values of the stage's dtype)."""
        x = x.float().contiguous().clone()  # updated in place
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        rows = x.shape[0]
        pos, seg_rows = [], []
        for s in segments:
            n = s.rows.stop - s.rows.start
            pos += range(s.start_pos, s.start_pos + n)
            seg_rows.append(n)
        positions = torch.tensor(pos, dtype=torch.int64)
        scratch = self._scratch(rows * self.row_scratch + rows * (max(pos) + 1) + 16)
        caps = torch.tensor(
            [s.kv[0][0].shape[1] for s, n in zip(segments, seg_rows, strict=True) for _ in range(n)]
        )
        for s, n in zip(segments, seg_rows, strict=True):
            for k, v in s.kv:
                assert k.is_contiguous() and v.is_contiguous() and k.shape[1] >= s.start_pos + n
        # each row's cache of each layer: [layers, rows] addresses, made in one call
        k_ptrs, v_ptrs = (
            torch.tensor(
                [
                    [kv[i][j].data_ptr() for s, n in zip(segments, seg_rows, strict=True)
                     for kv in [s.kv] for _ in range(n)]
                    for i in range(len(self.layers))
                ],
                dtype=torch.int64,
            )
            for j in (0, 1)
        )  # fmt: skip
        for i, layer in enumerate(self.layers):
            self.kernels.layer_rows(
                layer, x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), k_ptrs[i].data_ptr(),
                v_ptrs[i].data_ptr(), caps.data_ptr(), positions.data_ptr(), scratch.data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's float32 logits [M, vocab] of hidden rows x [M, hidden]."""
        x = x.float().contiguous()
        rows = x.shape[0]
        out = torch.empty(rows, self.head.n)
        scratch = self._scratch(rows * (self.hidden + self.hidden // 16 + 1) + 16)
        self.kernels.head_rows(
            x.data_ptr(), rows, self.hidden, self.final_norm, self.eps, self.act, self.head,
            out.data_ptr(), scratch.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out


def range_model(
    args: LlamaArgs, weights: RangeWeights, device: torch.device, batch_invariant: bool = False
) -> RangeModel:
    """The range's model with the C path where it applies (see the module's docstring), and
    in the batch-invariant mode on a GPU with invariant_gpu.py's kernels."""
    fused = FusedLayers.build(args, weights, device, batch_invariant)
    kernels = None
    if batch_invariant and device.type == "cuda":
        matrices = [m for w in weights.layers for m in (w.wqkv, w.wo, w.w_gate_up, w.w_down)]
        head = weights.head if weights.head is not None else weights.embed
        if not all(isinstance(m, torch.Tensor) for m in [*matrices, head] if m is not None):
            raise FailedPrecondition(
                "--batch-invariant on a GPU has kernels for bfloat16, float16 and float32 "
                "weights only: start the stage without --quantize"
            )
        from stage_service import invariant_gpu as kernels  # Triton: GPU hosts only
    return RangeModel(args, weights, device, fused, kernels)
