"""The stage: holds one layer range and its session caches, runs steps. No gRPC in here.

A stage starts with no layers; the orchestrator assigns a range with `load_layers`, tagged with
the plan epoch that every step must then carry.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from protos.errors import (
    FailedPrecondition,
    InvalidArgument,
    LlamadistError,
    NotFound,
    OutOfRange,
)
from protos.limits import MAX_BATCH_BYTES, MAX_DRAFT_TOKENS, check_session_id
from protos.sampling import Sampling
from protos.shared.model_files import TensorIndex, read_config
from protos.shared.submodel import Held, describe, held, layer_of
from stage_service import cpu_kernels
from stage_service.batcher import Batcher, Job
from stage_service.config import StageConfig
from stage_service.decode import StaticDecoder
from stage_service.fused_layers import range_model
from stage_service.kv_cache import CacheShape, Session, SessionCache, check_slot_budget
from stage_service.metrics import StageMetrics
from stage_service.model import LlamaArgs, RangeModel, Segment
from stage_service.sampling import NonFiniteLogits, sample_rows
from stage_service.shipped import ShippedWeights
from stage_service.speed import measure_gflops
from stage_service.verify import RowInputs, Verdict, accept, add_rows
from stage_service.weight_cache import Entry, OfferAnswer, WeightCache
from stage_service.weights import Quantization, TensorSource, load_range, weight_bytes

log = logging.getLogger(__name__)

# How far a new plan epoch may jump: orchestrators count plans one by one, so a far larger jump
# is a stray message, which would leave no epoch for later plans to go above.
MAX_EPOCH_JUMP = 2**32


@dataclass
class StepInput:
    session_id: str
    plan_epoch: int
    start_pos: int
    token_ids: list[int]
    hidden: torch.Tensor | None  # [S, hidden]; None on the first stage
    sampling: Sampling
    return_logits: bool = False
    draft_tokens: int = 0  # the last ones of token_ids are drafted: verify them (verify.py)


@dataclass
class StepOutput:
    hidden: torch.Tensor | None = None
    token_id: int = 0
    logprob: float = 0.0
    logits: torch.Tensor | None = None
    compute_ns: int = 0
    batch_size: int = 1  # sessions in the forward this step ran in
    draft_tokens: int = 0  # a verify step: the drafts it verified (echoed on the wire)
    accepted_drafts: int = 0  # a verify step: drafted tokens kept before token_id
    draft_logprobs: list[float] = field(default_factory=list)


@dataclass
class Loaded:
    model: RangeModel
    cache: SessionCache
    weight_bytes: int
    epoch: int
    decoder: StaticDecoder | None = None  # static KV: decode steps of one token per session


def release_freed_memory() -> None:
    """Hands memory freed inside the heap back to the system (glibc's malloc_trim): loading a
    quantized range frees a float copy of every matrix, which the allocator would otherwise
    keep in the process's RSS."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# CPU instructions that make a 16-bit dtype pay (any one of them).
HALF_INSTRUCTIONS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


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


class Stage:
    def __init__(self, config: StageConfig):
        self.config = config
        # No model directory (--fetch-weights): the model's config comes with the first offer.
        self.model_dir = Path(config.model) if config.model else None
        self.args: LlamaArgs | None = None
        self.held = Held(0, 0, 0, "")  # the layers the model directory holds
        if self.model_dir is not None:
            self.args = LlamaArgs.from_config(read_config(self.model_dir))
            self.held = held(self.model_dir)  # all layers, or a submodel's range (checked)
        self.fingerprint = self.held.fingerprint
        self.shipped: ShippedWeights | None = None
        if config.fetch_weights:
            cache = WeightCache(Path(config.weights_cache), config.weights_cache_mb * 2**20)
            self.shipped = ShippedWeights(cache)
        self.weights_source = ""  # of the range in force: local, submodel, wire, cache
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        check_cpu_dtype(config, self.device, self.dtype)
        check_cuda_quantize(config, self.device)
        check_gpu_batch_invariant(config, self.device)
        self.loaded: Loaded | None = None
        self.gflops = measure_gflops(self.device, self.dtype)
        # One forward at a time: torch already uses the stage's threads inside each op.
        self._compute = threading.Lock()
        self._admin = threading.Lock()  # one layer assignment at a time
        self.epoch = 0  # the plan epoch of the assignment in force (0: none yet)
        self.peers: frozenset[str] = frozenset()  # its plan's stage addresses (forwarding)
        self.batcher = Batcher(self._run_batch, config.max_batch, config.max_batch_tokens)
        self.metrics = StageMetrics(self)

    # ------------------------------------------------------------------ admin

    def _check_epoch(self, epoch: int, same_as_in_force: bool) -> bool:
        """Whether an assignment under `epoch` is to be carried out: it must come from a newer
        plan than the one in force; the same epoch is a retry, a no-op when it asks for what is
        in force already. Anything else (a stray or replayed message) is refused."""
        if epoch == self.epoch and same_as_in_force:
            return False
        if epoch > self.epoch + MAX_EPOCH_JUMP:
            raise InvalidArgument(
                f"plan epoch {epoch} is implausibly far past the epoch in force ({self.epoch}); "
                "an orchestrator's epochs grow by one per plan"
            )
        if epoch <= self.epoch:
            raise FailedPrecondition(
                f"plan epoch {epoch} is not newer than the epoch in force ({self.epoch}); "
                "layer assignments come from the orchestrator's plan reloads"
            )
        return True

    def drop_layers(self, epoch: int) -> None:
        """Holds nothing from plan `epoch` on (frees the range and every cached session)."""
        with self._admin:
            if not self._check_epoch(epoch, self.loaded is None):
                return
            with self._compute:
                self._release(epoch)

    def _release(self, epoch: int) -> None:
        """Drops the range in force (and every cached session); `epoch` is in force from now,
        even if a load that follows fails. Call holding the compute lock."""
        if self.loaded is not None and self.loaded.decoder is not None:
            gc.unfreeze()  # the old range's objects become collectable again (see _load)
        self.loaded = None
        self.epoch = epoch
        self.peers = frozenset()

    def load_layers(
        self, start: int, end: int, epoch: int, peers: frozenset[str] = frozenset()
    ) -> None:
        """Loads [start, end) under plan `epoch` and drops the old range with every cached
        session (see _check_epoch for which epochs are taken). `peers`: the plan's stage
        addresses, the only ones this stage forwards steps to (part of the assignment)."""
        if self.args is None:
            raise FailedPrecondition(
                "this stage has no model directory and no weights were offered yet: the "
                "orchestrator offers them (OfferWeights) before it assigns layers"
            )
        if not 0 <= start < end <= self.args.num_layers:
            raise InvalidArgument(
                f"layer range [{start}, {end}) is not inside the model's "
                f"{self.args.num_layers} layers (to hold nothing, ask for that explicitly)"
            )
        missing = self.held.missing(start, end)
        if missing and self.shipped is None:
            raise FailedPrecondition(
                f"this stage's model directory holds layers {self.held.start}-"
                f"{self.held.end - 1} only (a submodel); the plan gives it {start}-{end - 1}: "
                f"it lacks layers {describe(missing)} (start it with --fetch-weights to take "
                "them from the orchestrator)"
            )
        with self._admin:
            loaded = self.loaded
            w = loaded.model.weights if loaded is not None else None
            same = w is not None and (w.start, w.end) == (start, end) and peers == self.peers
            if self._check_epoch(epoch, same):
                self._load(start, end, epoch)
                self.peers = peers

    def _load(self, start: int, end: int, epoch: int) -> None:
        shape = CacheShape(
            num_layers=end - start,
            kv_heads=self.args.num_kv_heads,
            head_dim=self.args.head_dim,
            dtype=self.dtype,
            device=self.device,
            max_positions=self.max_context,
        )
        static = self.config.use_static_kv
        if static:
            check_slot_budget(shape, self.config.kv_cache_mb * 2**20)  # before dropping anything
        source, kinds = self._source(start, end)  # before dropping anything too
        with self._compute:
            self._release(epoch)  # free the old range before reading the new one
            quant = Quantization(self.config.quantize, self.config.group, self.rows_quantized)
            weights = load_range(source, self.args, start, end, self.dtype, self.device, quant)
            self.weights_source = "+".join(kinds)
            cache = SessionCache(
                shape,
                self.config.kv_cache_mb * 2**20,
                self.config.session_ttl_s,
                static=static,
            )
            model = range_model(self.args, weights, self.device, self.config.use_batch_invariant)
            decoder = None
            # A CPU batch-invariant range runs every step through its C layers, decode steps
            # on static slots too (their caches are the slots' views).
            if static and not (model.fused is not None and model.fused.every_step):
                graphs = self.config.cuda_graphs and self.device.type == "cuda"
                rows = min(self.config.max_batch, cache.pool.slots)
                decoder = StaticDecoder(model, cache.pool, rows, graphs, self.config.compile)
                if graphs:
                    t0 = time.perf_counter()
                    decoder.capture_all()
                    log.info(
                        "captured %d decode graphs in %.1f s",
                        decoder.captured,
                        time.perf_counter() - t0,
                    )
            self.loaded = Loaded(model, cache, weight_bytes(weights), epoch, decoder)
            release_freed_memory()  # the float copies quantization read, and the old range
            if decoder is not None and decoder.graphs:
                # What loading made (graphs, compiled code: a great many objects) is kept out of
                # the collector's full scans, whose pauses would land on ~3 ms decode steps.
                gc.collect()
                gc.freeze()

    def _source(self, start: int, end: int):
        """Where [start, end) is read from, and the kinds of source that makes (checked before
        the range in force is dropped: a range the stage cannot read leaves it serving)."""
        local = TensorIndex(self.model_dir) if self.model_dir is not None else None
        missing = self.held.missing(start, end)
        own = "local" if self.held.end - self.held.start == self.args.num_layers else "submodel"
        kinds = [own] if len(missing) < end - start else []  # some layers are its own
        if not missing:
            return TensorSource(local), kinds
        names = self.shipped.names_for(start, end, self.args.num_layers)
        offered = {layer_of(n) for n in names}
        lacking = [i for i in missing if i not in offered]
        if lacking:
            raise FailedPrecondition(
                f"layers {describe(lacking)} are neither in this stage's model directory nor "
                "in the weights offered to it: the orchestrator ships a range's tensors "
                "(OfferWeights, PutWeights) before it assigns the range"
            )
        source, shipped_kinds = self.shipped.source(local, names)
        return source, kinds + shipped_kinds

    # ------------------------------------------------------------------ weights over the wire

    def offer_weights(
        self, fingerprint: str, config_json: str, entries: list[Entry]
    ) -> OfferAnswer:
        """What the weights cache lacks of a range the orchestrator offers; a stage without
        a model directory takes the model's config from the first offer."""
        if self.shipped is None:
            raise FailedPrecondition(
                "this stage was started without --fetch-weights: it reads its weights from "
                f"{self.model_dir} only"
            )
        if self.fingerprint and fingerprint != self.fingerprint:
            raise FailedPrecondition(
                f"this stage holds model {self.fingerprint} (its --model {self.model_dir}); "
                f"the orchestrator offers model {fingerprint}: give them the same model"
            )
        answer = self.shipped.take_offer(fingerprint, config_json, entries)
        with self._admin:
            if self.args is None:
                self.args = LlamaArgs.from_config(self.shipped.offer.config)
                self.fingerprint = fingerprint
        return answer

    def close(self) -> None:
        """Releases the weights cache directory (for another stage in this process)."""
        if self.shipped is not None:
            self.shipped.cache.close()

    def receive_weights(self, chunks) -> tuple[int, int]:
        """Bytes of offered tensors into the cache: (bytes written, tensors completed)."""
        if self.shipped is None:
            raise FailedPrecondition("this stage was started without --fetch-weights")
        return self.shipped.receive(chunks)

    def info(self) -> dict:
        loaded = self.loaded
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
        else:
            vm = psutil.virtual_memory()
            free, total = vm.available, vm.total
        out = {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantize": self.weight_format,
            "quant_kernel": self.quant_kernel,
            "held_layer_start": self.held.start,
            "held_layer_end": self.held.end,
            "fetches_weights": self.shipped is not None,
            "weights_source": self.weights_source if loaded is not None else "",
            "num_layers": self.args.num_layers if self.args is not None else 0,
            "kv_budget_bytes": self.config.kv_cache_mb * 2**20,
            "memory_total_bytes": total,
            "memory_free_bytes": free,
            "model_fingerprint": self.fingerprint,
            "threads": torch.get_num_threads(),
            "gflops": self.gflops,
            "max_context": self.max_context,
            "plan_epoch": self.epoch,
            "batch_invariant": self.config.use_batch_invariant,
        }
        if loaded is not None:
            loaded.cache.sweep()
            w = loaded.model.weights
            out |= {
                "layer_start": w.start,
                "layer_end": w.end,
                "has_embeddings": w.is_first,
                "has_head": w.is_last,
                "weight_bytes": loaded.weight_bytes,
                "kv_used_bytes": loaded.cache.used_bytes,
                "kv_bytes_per_token": loaded.cache.shape.bytes_per_token,
                "active_sessions": len(loaded.cache),
            }
        return out

    @property
    def rows_quantized(self) -> bool:
        """Whether the embedding and head are quantized too (CPU; see weights.Quantization)."""
        return self.device.type == "cpu"

    @property
    def weight_format(self) -> str:
        """none, or <int8|int4>-g<group>, with -float-head where the embedding and head stay in
        the stage's dtype (orchestrator/profile.py counts the bytes from it)."""
        fmt = self.config.weight_format
        return fmt if fmt == "none" or self.rows_quantized else f"{fmt}-float-head"

    @property
    def quant_kernel(self) -> str:
        if self.config.quantize == "none":
            return ""
        if self.device.type != "cpu":
            if self.config.quantize == "int4":
                return "tinygemm (torch._weight_int4pack_mm) where shapes allow, else torch"
            return "torch, dequantized per call (slower than bf16: no int8 kernel here)"
        kernels, why = cpu_kernels.load()
        return why if kernels is not None else f"torch ({why})"

    @property
    def max_context(self) -> int:
        """The most tokens a session may reach on this stage."""
        if self.args is None:
            return 0
        context = self.args.max_position_embeddings
        return min(self.config.max_context or context, context)

    @property
    def holds_head(self) -> bool:
        """Whether this stage samples tokens (it holds the final norm and lm_head)."""
        loaded = self.loaded
        return loaded is not None and loaded.model.weights.is_last

    def ready(self) -> tuple[bool, str]:
        if not self.batcher.alive:
            return False, f"the compute thread died ({self.batcher.died}); restart the stage"
        if self.loaded is None:
            return False, "no layers loaded yet; the orchestrator assigns them"
        return True, ""

    # ------------------------------------------------------------------ serving

    def end_session(self, session_id: str) -> int:
        """Frees the session's cache; its queued steps are dropped (answered Cancelled)."""
        loaded = self._require_loaded()
        dropped = self.batcher.drop(session_id)
        try:
            return loaded.cache.end(session_id)
        except NotFound:
            if dropped:
                return 0  # only queued work: nothing was cached yet
            raise

    def forward(self, step: StepInput, cancelled: Callable[[], bool] | None = None) -> StepOutput:
        """Validates the step and runs it in the next batch of the compute thread (unless
        `cancelled()` says its caller is gone by then)."""
        self._validate(step, self._require_loaded())
        return self.batcher.submit(step, cancelled)

    def forward_many(
        self,
        steps: list[StepInput],
        on_done: Callable[[list[Job]], None],
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Queues the valid steps together (one forward where they fit) without waiting;
        `on_done(jobs)` runs once, on the compute thread, when all are done: one job per step in
        order, each with its out or its error (a step that fails validation is never queued; if
        none is queued, on_done runs here). No layers or shutting down raise here. Steps still
        queued when `cancelled()` turns true are dropped (answered Cancelled)."""
        loaded = self._require_loaded()
        jobs = [Job(step, cancelled=cancelled) for step in steps]
        queued = []
        for job in jobs:
            try:
                self._validate(job.step, loaded)
                queued.append(job)
            except Exception as err:  # noqa: BLE001 - that step's own failure
                job.error = err
        if queued:
            self.batcher.submit_many(queued, lambda: on_done(jobs))
        else:
            on_done(jobs)

    def _run_batch(self, jobs: list[Job]) -> None:
        """The compute thread: the jobs of a batch (one session each) run as one forward, the
        decode steps through the static decoder when the stage has one."""
        with self._compute:
            loaded = self._require_loaded()
            t0 = time.perf_counter_ns()
            ready: list[tuple[Job, Session]] = []
            for job in jobs:
                step: StepInput = job.step
                if step.plan_epoch != loaded.epoch:
                    job.error = FailedPrecondition("the stage's layers were reloaded; retry")
                    continue
                try:
                    session = loaded.cache.begin_step(
                        step.session_id, step.start_pos, len(step.token_ids)
                    )
                except LlamadistError as err:
                    job.error = err
                    continue
                ready.append((job, session))
            if not ready:
                return
            other, decode = self._paths(loaded, ready)
            ready = other + decode
            parts = []  # per job: hidden rows or logits rows, in `ready` order
            if other:
                parts.append(self._forward(loaded, other))
            if decode:
                parts.append(self._decode(loaded, decode))
            result = parts[0] if len(parts) == 1 else torch.cat(parts)
            for job, session in ready:
                session.length = job.step.start_pos + len(job.step.token_ids)
            if loaded.model.weights.is_last:
                outputs = self._sample(ready, result)
            else:
                outputs = self._hidden_outputs(loaded, ready, result)
            compute_ns = time.perf_counter_ns() - t0
            self.metrics.observe(len(ready), compute_ns / 1e9)
            for (job, _), out in zip(ready, outputs, strict=True):
                if isinstance(out, Exception):  # one session's failure is its own
                    job.error = out
                    continue
                out.compute_ns = compute_ns
                out.batch_size = len(ready)
                job.out = out

    @staticmethod
    def _paths(
        loaded: Loaded, ready: list[tuple[Job, Session]]
    ) -> tuple[list[tuple[Job, Session]], list[tuple[Job, Session]]]:
        """(general path, static decoder): the decoder takes decode steps (a token, maybe with
        the drafts it verifies: one row each, all on the session's slot) while their rows fit
        its largest bucket; prefills, replays and steps asking for full logits go the general
        way."""
        other, decode, rows = [], [], 0
        limit = loaded.decoder.max_rows if loaded.decoder is not None else 0
        for job, session in ready:
            step = job.step
            n = len(step.token_ids)
            if n == step.draft_tokens + 1 and not step.return_logits and rows + n <= limit:
                decode.append((job, session))
                rows += n
            else:
                other.append((job, session))
        return other, decode

    def _decode(self, loaded: Loaded, decode: list[tuple[Job, Session]]) -> torch.Tensor:
        """The decode steps through the static decoder: every input token a row."""
        steps = [job.step for job, _ in decode]
        slots, positions, tokens = [], [], []
        for step, (_, session) in zip(steps, decode, strict=True):
            n = len(step.token_ids)
            slots += [session.slot] * n
            positions += range(step.start_pos, step.start_pos + n)
            tokens += step.token_ids
        return loaded.decoder.run(slots, positions, tokens, self._hidden(loaded, steps))

    def _hidden_outputs(
        self, loaded: Loaded, ready: list[tuple[Job, Session]], result: torch.Tensor
    ) -> list[StepOutput | Exception]:
        """A middle stage: each job's hidden rows, on the host; a job whose rows are not finite
        (an overflow inside the range) fails rather than pass NaN or Inf on."""
        rows = result.cpu()  # one copy for the batch; the graph's output is reused
        finite = torch.isfinite(rows).all(dim=-1).tolist()
        outputs: list[StepOutput | Exception] = []
        row = 0
        for job, _ in ready:
            n = len(job.step.token_ids)
            if all(finite[row : row + n]):
                outputs.append(StepOutput(hidden=rows[row : row + n]))
            else:
                outputs.append(self._non_finite(loaded, "hidden state"))
            row += n
        return outputs

    def _non_finite(self, loaded: Loaded, what: str) -> OutOfRange:
        w = loaded.model.weights
        dtype = str(self.dtype).removeprefix("torch.")
        why = (
            "the weights or the input hold values float32 cannot carry"
            if dtype == "float32"
            else f"an overflow in {dtype}? try --dtype float32"
        )
        return OutOfRange(f"layers {w.start}-{w.end - 1} produced a {what} with NaN or Inf ({why})")

    def _hidden(self, loaded: Loaded, steps: list[StepInput]) -> torch.Tensor | None:
        """The steps' incoming hidden rows, on the host (None on the first stage)."""
        if loaded.model.weights.is_first:
            return None
        return torch.cat([s.hidden for s in steps])

    def _forward(self, loaded: Loaded, ready: list[tuple[Job, Session]]) -> torch.Tensor:
        """The general path (prefills, replays, full logits): one segment per session. Returns
        the hidden rows of every token, or logits: every row's when asked, else one per job."""
        segments, row = [], 0
        for job, session in ready:
            n = len(job.step.token_ids)
            segments.append(
                Segment(slice(row, row + n), job.step.start_pos, session.kv, session.slot)
            )
            row += n
        steps = [job.step for job, _ in ready]
        ids = torch.tensor([t for s in steps for t in s.token_ids], device=self.device)
        all_logits = steps[0].return_logits  # such a step runs alone (batcher)
        hidden = self._hidden(loaded, steps)
        if hidden is not None:
            hidden = hidden.to(self.device)
        tails = [s.draft_tokens + 1 for s in steps]
        return loaded.model.forward(segments, ids, hidden, all_logits, tails, loaded.cache.pool)

    def _sample(
        self, ready: list[tuple[Job, Session]], logits: torch.Tensor
    ) -> list[StepOutput | Exception]:
        """The last stage: each session's next token from its logits rows: its last row, or
        with drafted tokens its last draft_tokens + 1 rows, whose picks verify the drafts."""
        steps = [job.step for job, _ in ready]
        full = steps[0].return_logits  # then it is the batch's only step, every row its own
        rows = RowInputs()
        for step, (_, session) in zip(steps, ready, strict=True):
            session.seen_tokens.extend(step.token_ids)
            add_rows(
                rows,
                session.seen_tokens,
                step.start_pos,
                len(step.token_ids),
                step.draft_tokens,
                step.sampling,
                self.device,
            )
        decided = logits[-(steps[0].draft_tokens + 1) :] if full else logits
        picked = sample_rows(
            decided, rows.params, rows.seen, rows.generators, self.config.use_batch_invariant
        )
        outputs: list[StepOutput | Exception] = []
        row = 0
        for step in steps:
            n = step.draft_tokens + 1
            verdict = accept(
                step.token_ids[len(step.token_ids) - step.draft_tokens :], picked[row : row + n]
            )
            row += n
            if isinstance(verdict, NonFiniteLogits):
                outputs.append(self._non_finite(self._require_loaded(), "logits row"))
            elif isinstance(verdict, Exception):
                outputs.append(verdict)
            else:
                logits_out = logits.cpu() if full else None
                outputs.append(self._output(verdict, step.draft_tokens, logits_out))
        return outputs

    @staticmethod
    def _output(verdict: Verdict, drafts: int, logits: torch.Tensor | None) -> StepOutput:
        return StepOutput(
            draft_tokens=drafts,
            token_id=verdict.token_id,
            logprob=verdict.logprob,
            logits=logits,
            accepted_drafts=verdict.accepted,
            draft_logprobs=verdict.draft_logprobs,
        )

    def _check_reply_size(self, step: StepInput, is_last: bool) -> None:
        """A step whose answer (hidden rows, or float32 logits when asked) could not fit in one
        message is refused before any work."""
        n = len(step.token_ids)
        if is_last:
            row_bytes = self.args.vocab_size * 4 if step.return_logits else 0
        else:
            row_bytes = self.args.hidden_size * self.dtype.itemsize
        if n * row_bytes > MAX_BATCH_BYTES:
            raise InvalidArgument(
                f"a step of {n} tokens would answer {n * row_bytes:,} bytes, over the "
                f"{MAX_BATCH_BYTES:,}-byte message limit: send at most "
                f"{MAX_BATCH_BYTES // row_bytes} tokens per step"
            )

    def _require_loaded(self) -> Loaded:
        loaded = self.loaded
        if loaded is None:
            raise FailedPrecondition(
                "this stage holds no layers yet; the orchestrator assigns them"
            )
        return loaded

    def _validate(self, step: StepInput, loaded: Loaded) -> None:
        check_session_id(step.session_id)
        if step.plan_epoch != loaded.epoch:
            raise FailedPrecondition(
                f"step is for plan epoch {step.plan_epoch}, this stage serves epoch {loaded.epoch}"
            )
        if step.start_pos < 0:
            raise InvalidArgument(f"start_pos must be >= 0, got {step.start_pos}")
        if not step.token_ids:
            raise InvalidArgument("a step needs at least one token id")
        vocab = self.args.vocab_size
        bad = [t for t in step.token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if not 0 <= step.draft_tokens <= min(MAX_DRAFT_TOKENS, len(step.token_ids) - 1):
            raise InvalidArgument(
                f"draft_tokens must be in [0, {MAX_DRAFT_TOKENS}] and below the step's "
                f"{len(step.token_ids)} token ids (a drafted token follows an input token), "
                f"got {step.draft_tokens}"
            )
        weights = loaded.model.weights
        self._check_reply_size(step, weights.is_last)
        if weights.is_first:
            if step.hidden is not None:
                raise InvalidArgument("the first stage takes token ids, not a hidden state")
            return
        expected = (len(step.token_ids), self.args.hidden_size)
        if step.hidden is None:
            raise InvalidArgument(f"stage for layers {weights.start}.. needs a hidden state")
        if tuple(step.hidden.shape) != expected or step.hidden.dtype != self.dtype:
            raise InvalidArgument(
                f"hidden state must be {list(expected)} {self.dtype}, got "
                f"{list(step.hidden.shape)} {step.hidden.dtype}"
            )
        if not torch.isfinite(step.hidden).all():
            raise InvalidArgument("hidden state contains NaN or Inf")
