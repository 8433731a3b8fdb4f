"""Decode steps over the static slot pool, replayed as CUDA graphs on a GPU.

A decode step (one new token per session) has the same kernels every time; what costs on a GPU
is launching them one by one from Python (~500 per step for 16 layers). Here a step of B rows
whose longest context fits L positions runs as the graph captured for its bucket (B rounded up
to a power of two, L to a power of two at least MIN_CONTEXT, at most the slot's context):
inputs are copied into static tensors, the graph replays, the output is read from its static
tensor. Padding rows write their K/V into the pool's scratch slot and are dropped.

Attention reads each row's slot in one of two ways. Gathered: the rows' slots are copied out of
the pool (index_select) before the matmuls. Dense: when the batch's slots all lie below a bucket
of at most twice the batch's own, row j of the step *is* slot j (the batch's rows are placed at
their slots, the others are padding) and attention reads the pool's first slots in place: no
copy, at the price of padding rows. On a GPU the gather was a fifth of a 64-row step.

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
        # rows: token ids, positions, slots (the graphs' inputs), and the step's slots in its
        # order (where its rows sit when dense)
        self._meta = torch.zeros(4, self.max_rows, dtype=torch.long, device=self.device)
        self._hidden = None
        shape = (self.max_rows, model.args.hidden_size)
        if not model.weights.is_first:
            self._hidden = torch.zeros(shape, dtype=model.dtype, device=self.device)
        if graphs:  # a step's inputs go up from pinned buffers, one async copy each
            self._meta_host = torch.zeros(self._meta.shape, dtype=torch.long, pin_memory=True)
            if self._hidden is not None:
                self._hidden_host = torch.zeros(shape, dtype=model.dtype, pin_memory=True)
                self._hidden_up = torch.zeros_like(self._hidden)  # the rows before placing
            self._copied = torch.cuda.Event()  # the last step's copies out of them are done
        self._captured: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if graphs else None

    @property
    def captured(self) -> int:
        return len(self._captured)

    def capture_all(self) -> None:
        """Captures the graph of every (rows, context, dense) bucket, rows on the scratch slot."""
        self._meta.zero_()
        self._meta[2].fill_(self.pool.scratch)
        contexts = sorted({self.context_bucket(bucket(1, MIN_CONTEXT) << i) for i in range(32)})
        with torch.cuda.device(self.device):
            for context in contexts:
                rows = 1
                while rows <= self.max_rows:
                    self._graph(rows, context, dense=False)
                    if rows <= self.pool.slots:
                        self._graph(rows, context, dense=True)
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
        positions[b] (a slot may take several consecutive positions: a token and its drafts,
        each row attending up to its own). Returns [n, hidden] or float32 logits [n, vocab],
        valid until the next run (a view of the graph's output)."""
        n = len(slots)
        context = self.context_bucket(max(positions) + 1)
        rows = bucket(n)
        dense_rows = bucket(max(slots) + 1)
        # dense needs one row per slot; a verify step has several rows on its session's slot
        one_per_slot = len(set(slots)) == n
        dense = one_per_slot and dense_rows <= min(2 * rows, self.max_rows, self.pool.slots)
        if dense:
            rows = dense_rows
        pad_ids, pad_pos, pad_slots = [0] * rows, [0] * rows, [self.pool.scratch] * rows
        if dense:  # row j is slot j: the batch's rows go to their slots, the rest is padding
            for slot, token, pos in zip(slots, token_ids, positions, strict=True):
                pad_ids[slot], pad_pos[slot], pad_slots[slot] = token, pos, slot
        else:
            pad_ids[:n], pad_pos[:n], pad_slots[:n] = token_ids, positions, slots
        if not self.graphs:
            meta = torch.tensor([pad_ids, pad_pos, pad_slots], device=self.device)
            inputs = meta[0]
            if hidden is not None:
                inputs = self._place(torch.zeros_like(self._hidden[:rows]), hidden, slots, dense)
            out = self.model.decode(self.pool, inputs, meta[1], meta[2], context, self.parts, dense)
            return self._rows(out, slots, dense)
        permuted = dense and slots != list(range(n))  # rows not already at their slots
        with torch.cuda.device(self.device):
            order = self._upload(rows, [pad_ids, pad_pos, pad_slots, slots], hidden, permuted)
            if hidden is not None and permuted:
                self._hidden[:rows].index_copy_(0, order, self._hidden_up[:n])
            graph, out = self._graph(rows, context, dense)
            graph.replay()
            return out.index_select(0, order) if permuted else out[:n]

    def _upload(
        self, rows: int, meta: list[list[int]], hidden: torch.Tensor | None, permuted: bool
    ) -> torch.Tensor:
        """The graph's inputs onto the device without a synchronous copy: written into the
        pinned buffers (once the last step's copies out of them are done), then one async copy
        each; hidden rows to be permuted into their slots go to a staging buffer. Returns the
        step's slots, in its order, on the device."""
        n = len(meta[3])
        self._copied.synchronize()
        host = self._meta_host
        host[:3, :rows] = torch.tensor(meta[:3])
        host[3, :n] = torch.tensor(meta[3])
        self._meta.copy_(host, non_blocking=True)
        if hidden is not None:
            self._hidden_host[:n].copy_(hidden)
            up = self._hidden_up if permuted else self._hidden
            up[:n].copy_(self._hidden_host[:n], non_blocking=True)
        self._copied.record()
        return self._meta[3, :n]

    def _place(
        self, static: torch.Tensor, hidden: torch.Tensor, slots: list[int], dense: bool
    ) -> torch.Tensor:
        """The step's hidden rows (on the host) into the input rows (at their slots when
        dense): one copy to the device."""
        if dense and slots != list(range(len(slots))):
            static.index_copy_(0, torch.tensor(slots, device=self.device), hidden.to(self.device))
        else:  # gathered, or dense with rows already in slot order (a lone session in slot 0)
            static[: len(slots)].copy_(hidden)
        return static

    def _rows(self, out: torch.Tensor, slots: list[int], dense: bool) -> torch.Tensor:
        """The output rows of the step's sessions, in its order."""
        if dense and slots != list(range(len(slots))):
            return out.index_select(0, torch.tensor(slots, device=self.device))
        return out[: len(slots)]

    def _graph(
        self, rows: int, context: int, dense: bool
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (rows, context, dense)
        if key not in self._captured:
            meta = self._meta[:, :rows]
            inputs = meta[0] if self._hidden is None else self._hidden[:rows]

            def step() -> torch.Tensor:
                return self.model.decode(
                    self.pool, inputs, meta[1], meta[2], context, self.parts, dense
                )

            step()  # warm-up: lazy initialisation stays out of the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                out = step()
            self._captured[key] = (graph, out)
            log.debug("captured the decode graph for %s (rows, positions, dense)", key)
        return self._captured[key]
