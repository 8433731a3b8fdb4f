"""The stage: holds one layer range and its session caches, runs steps. No gRPC in here.

A stage starts with no layers; the orchestrator assigns a range with `load_layers`, tagged with
the plan epoch that every step must then carry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from protos.errors import FailedPrecondition, InvalidArgument, LlamadistError
from protos.limits import check_session_id
from protos.sampling import Sampling
from stage_service.batcher import Batcher, Job
from stage_service.config import StageConfig
from stage_service.kv_cache import CacheShape, SessionCache
from stage_service.model import LlamaArgs, RangeModel, Segment
from stage_service.sampling import sample
from stage_service.speed import measure_gflops
from stage_service.weights import load_range, model_fingerprint, read_config, weight_bytes


@dataclass
class StepInput:
    session_id: str
    plan_epoch: int
    start_pos: int
    token_ids: list[int]
    hidden: torch.Tensor | None  # [S, hidden]; None on the first stage
    sampling: Sampling
    return_logits: bool = False


@dataclass
class StepOutput:
    hidden: torch.Tensor | None = None
    token_id: int = 0
    logprob: float = 0.0
    logits: torch.Tensor | None = None
    compute_ns: int = 0
    batch_size: int = 1  # sessions in the forward this step ran in


@dataclass
class Loaded:
    model: RangeModel
    cache: SessionCache
    weight_bytes: int
    epoch: int


class Stage:
    def __init__(self, config: StageConfig):
        self.config = config
        self.model_dir = Path(config.model)
        self.args = LlamaArgs.from_config(read_config(self.model_dir))
        self.fingerprint = model_fingerprint(self.model_dir)
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.loaded: Loaded | None = None
        self.gflops = measure_gflops(self.device, self.dtype)
        # One forward at a time: torch already uses the stage's threads inside each op.
        self._compute = threading.Lock()
        self.batcher = Batcher(self._run_batch, config.max_batch, config.max_batch_tokens)

    # ------------------------------------------------------------------ admin

    def load_layers(self, start: int, end: int, epoch: int) -> None:
        """Loads [start, end) and drops the old range with every cached session; an empty
        range (start == end) leaves the stage holding nothing."""
        if not (start == end == 0 or 0 <= start < end <= self.args.num_layers):
            raise InvalidArgument(
                f"layer range [{start}, {end}) is not inside the model's "
                f"{self.args.num_layers} layers (an empty range is 0..0)"
            )
        with self._compute:
            self.loaded = None  # free the old range before reading the new one
            if start == end:
                return
            weights = load_range(self.model_dir, self.args, start, end, self.dtype, self.device)
            shape = CacheShape(
                num_layers=end - start,
                kv_heads=self.args.num_kv_heads,
                head_dim=self.args.head_dim,
                dtype=self.dtype,
                device=self.device,
                max_positions=self.args.max_position_embeddings,
            )
            self.loaded = Loaded(
                model=RangeModel(self.args, weights, self.device),
                cache=SessionCache(
                    shape, self.config.kv_cache_mb * 2**20, self.config.session_ttl_s
                ),
                weight_bytes=weight_bytes(weights),
                epoch=epoch,
            )

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
            "num_layers": self.args.num_layers,
            "kv_budget_bytes": self.config.kv_cache_mb * 2**20,
            "memory_total_bytes": total,
            "memory_free_bytes": free,
            "model_fingerprint": self.fingerprint,
            "threads": torch.get_num_threads(),
            "gflops": self.gflops,
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
                "plan_epoch": loaded.epoch,
            }
        return out

    def ready(self) -> tuple[bool, str]:
        if self.loaded is None:
            return False, "no layers loaded yet; the orchestrator assigns them"
        return True, ""

    # ------------------------------------------------------------------ serving

    def end_session(self, session_id: str) -> int:
        return self._require_loaded().cache.end(session_id)

    def forward(self, step: StepInput) -> StepOutput:
        """Validates the step and runs it in the next batch of the compute thread."""
        self._validate(step, self._require_loaded())
        return self.batcher.submit(step)

    def forward_async(self, step: StepInput, on_done: Callable[[Job], None]) -> None:
        """The same without waiting: `on_done(job)` runs on the compute thread (job.out or
        job.error). Validation errors raise here."""
        self._validate(step, self._require_loaded())
        self.batcher.submit_async(step, on_done)

    def _run_batch(self, jobs: list[Job]) -> None:
        """The compute thread: one forward for every job of the batch (one segment each)."""
        with self._compute:
            loaded = self._require_loaded()
            t0 = time.perf_counter_ns()
            segments, ready, row = [], [], 0
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
                n = len(step.token_ids)
                segments.append(Segment(slice(row, row + n), step.start_pos, session.kv))
                ready.append((job, session))
                row += n
            if not ready:
                return
            steps = [job.step for job, _ in ready]
            ids = torch.tensor([t for s in steps for t in s.token_ids], device=self.device)
            hidden = None
            if not loaded.model.weights.is_first:
                hidden = torch.cat([s.hidden for s in steps]).to(self.device)
            all_logits = steps[0].return_logits  # such a step runs alone (batcher)
            result = loaded.model.forward(segments, ids, hidden, all_logits=all_logits)
            compute_ns = time.perf_counter_ns() - t0
            for i, ((job, session), seg) in enumerate(zip(ready, segments, strict=True)):
                session.length = seg.start_pos + seg.rows.stop - seg.rows.start
                try:  # one session's failure (a sampling error) is its own, not the batch's
                    if loaded.model.weights.is_last:
                        job.out = self._sample(job.step, session, result, i, seg)
                    else:
                        job.out = StepOutput(hidden=result[seg.rows])
                except Exception as err:  # noqa: BLE001 - handed to that caller only
                    job.error = err
                    continue
                job.out.compute_ns = compute_ns
                job.out.batch_size = len(ready)

    def _sample(self, step: StepInput, session, result, i: int, seg: Segment) -> StepOutput:
        session.seen_tokens.extend(step.token_ids)
        if step.start_pos == 0 and step.sampling.seed is not None:
            session.generator = torch.Generator(device=self.device)
            session.generator.manual_seed(step.sampling.seed)
        logits = result[seg.rows] if step.return_logits else result[i : i + 1]
        token, logprob = sample(logits[-1], step.sampling, session.seen_tokens, session.generator)
        return StepOutput(
            token_id=token, logprob=logprob, logits=logits if step.return_logits else None
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
        weights = loaded.model.weights
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
