"""Decode steps over the static slot pool, replayed as CUDA graphs on a GPU.

A decode step (one new token per session) has the same kernels every time; what costs on a GPU
is launching them one by one from Python (~500 per step for 16 layers). Here a step of B rows
whose longest context fits L positions runs as the graph captured for its bucket (B rounded up
to a power of two, L to a power of two at least MIN_CONTEXT, at most the slot's context):
inputs are copied into static tensors, the graph replays, the output is read from its static
tensor. Padding rows write their K/V into the pool's scratch slot and are dropped.

Every bucket's graph is captured when the layers are loaded (`capture_all`: a warm-up run, then
the capture, with every row on the scratch slot), so that no step pays for a capture; they share
one memory pool.
Without graphs (on CPU, or with --no-cuda-graphs) the same fixed-shape math runs eagerly on the
exact rows, which is what the CPU tests check against transformers.
"""

from __future__ import annotations

import logging

import torch

from stage_service.kv_cache import SlotPool
from stage_service.model import EAGER, LayerParts, RangeModel, out_proj_mlp, qkv_rope

log = logging.getLogger(__name__)

MIN_CONTEXT = 64


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= n (and >= smallest)."""
    size = smallest
    while size < n:
        size *= 2
    return size


class StaticDecoder:
    def __init__(
        self, model: RangeModel, pool: SlotPool, max_rows: int, graphs: bool, compile: bool = False
    ):
        """compile: each layer's pure ends through torch.compile (fused elementwise kernels;
        compiled when the graphs are captured)."""
        self.model = model
        self.parts = EAGER
        if compile:
            self.parts = LayerParts(
                torch.compile(qkv_rope, dynamic=True), torch.compile(out_proj_mlp, dynamic=True)
            )
        self.pool = pool
        self.graphs = graphs
        self.device = model.device
        self.context = pool.k[0].shape[2] if pool.k else 0
        self.max_rows = bucket(max_rows)
        self._meta = torch.zeros(3, self.max_rows, dtype=torch.long, device=self.device)
        self._hidden = None
        if not model.weights.is_first:
            dtype = model.weights.layers[0].wqkv.dtype
            shape = (self.max_rows, model.args.hidden_size)
            self._hidden = torch.zeros(shape, dtype=dtype, device=self.device)
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if graphs else None

    @property
    def captured(self) -> int:
        return len(self._captured)

    def capture_all(self) -> None:
        """Captures the graph of every (rows, context) bucket, rows on the scratch slot."""
        self._meta.zero_()
        self._meta[2].fill_(self.pool.scratch)
        contexts = sorted({self.context_bucket(bucket(1, MIN_CONTEXT) << i) for i in range(32)})
        with torch.cuda.device(self.device):
            for context in contexts:
                rows = 1
                while rows <= self.max_rows:
                    self._graph(rows, context)
                    rows *= 2

    def context_bucket(self, longest: int) -> int:
        return min(bucket(longest, MIN_CONTEXT), self.context)

    def run(
        self,
        slots: list[int],
        positions: list[int],
        token_ids: list[int],
        hidden: torch.Tensor | None,
    ) -> torch.Tensor:
        """Rows b: session slot slots[b] takes token_ids[b] (first stage) or hidden[b] at
        positions[b]. Returns [n, hidden] or float32 logits [n, vocab], valid until the next
        run (a view of the graph's output)."""
        n = len(slots)
        context = self.context_bucket(max(positions) + 1)
        if not self.graphs:
            meta = torch.tensor([token_ids, positions, slots], device=self.device)
            inputs = meta[0] if hidden is None else hidden.to(self.device)
            return self.model.decode(self.pool, inputs, meta[1], meta[2], context, self.parts)
        rows = bucket(n)
        pad = rows - n
        meta = torch.tensor(
            [token_ids + [0] * pad, positions + [0] * pad, slots + [self.pool.scratch] * pad]
        )
        with torch.cuda.device(self.device):
            self._meta[:, :rows].copy_(meta)
            if hidden is not None:
                self._hidden[:n].copy_(hidden)
            graph, out = self._graph(rows, context)
            graph.replay()
        return out[:n]

    def _graph(self, rows: int, context: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (rows, context)
        if key not in self._captured:
            meta = self._meta[:, :rows]
            inputs = meta[0] if self._hidden is None else self._hidden[:rows]

            def step() -> torch.Tensor:
                return self.model.decode(self.pool, inputs, meta[1], meta[2], context, self.parts)

            step()  # warm-up: lazy initialisation stays out of the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                out = step()
            self._captured[key] = (graph, out)
            log.debug("captured the decode graph for %d rows, %d positions", rows, context)
        return self._captured[key]
