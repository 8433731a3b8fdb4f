"""The compute thread's work: one batch of steps (one session each) through the range in
force. It admits each step to its session's cache, chooses each step's path (the static
decoder for decode steps, the general path for the rest), runs them, and makes each step's
output: the hidden rows a middle stage passes on, or on the last stage the sampled token
(verifying drafted tokens). No gRPC in here; the batcher (batcher.py) calls `run`.
"""

from __future__ import annotations

import time

import torch

from protos.errors import FailedPrecondition, LlamadistError, OutOfRange
from stage_service.batcher import Job
from stage_service.kv_cache import Session
from stage_service.metrics import StageMetrics
from stage_service.model import Segment
from stage_service.range_holder import LoadedRange, RangeHolder
from stage_service.sampling import NonFiniteLogits, sample_rows
from stage_service.steps import StepInput, StepOutput, finite_rows
from stage_service.verify import RowInputs, Verdict, accept, add_rows

Admitted = list[tuple[Job, Session]]  # the jobs of a batch that run, with their sessions


class BatchRunner:
    def __init__(self, holder: RangeHolder, metrics: StageMetrics, batch_invariant: bool):
        """`metrics` observes every batch run; `batch_invariant`: sample each row as if it ran
        alone (--batch-invariant)."""
        self.holder = holder
        self.metrics = metrics
        self.batch_invariant = batch_invariant

    def run(self, jobs: list[Job]) -> None:
        """Runs a batch as one pass through the layers: the decode steps through the static
        decoder when the stage has one, the rest the general way; sets each job's out or
        error (one session's failure is its own)."""
        with self.holder.compute_lock:
            loaded = self.holder.require_loaded()
            t0 = time.perf_counter_ns()
            general, decode = self._split_by_path(loaded, self._admit(loaded, jobs))
            if not general and not decode:
                return
            admitted = general + decode
            parts = []  # per job: hidden rows or logits rows, in `admitted` order
            if general:
                parts.append(self._run_general(loaded, general))
            if decode:
                parts.append(self._decode(loaded, decode))
            result = parts[0] if len(parts) == 1 else torch.cat(parts)
            for job, session in admitted:
                session.length = job.step.start_pos + len(job.step.token_ids)
            if loaded.model.weights.is_last:
                outputs = self._sample(loaded, admitted, result)
            else:
                outputs = self._hidden_outputs(loaded, admitted, result)
            compute_ns = time.perf_counter_ns() - t0
            self.metrics.observe(len(admitted), compute_ns / 1e9)
            for (job, _), out in zip(admitted, outputs, strict=True):
                if isinstance(out, Exception):
                    job.error = out
                    continue
                out.compute_ns = compute_ns
                out.batch_size = len(admitted)
                job.out = out

    @staticmethod
    def _admit(loaded: LoadedRange, jobs: list[Job]) -> Admitted:
        """The jobs whose session cache takes their tokens (the others fail with why)."""
        admitted: Admitted = []
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
            admitted.append((job, session))
        return admitted

    @staticmethod
    def _split_by_path(loaded: LoadedRange, admitted: Admitted) -> tuple[Admitted, Admitted]:
        """(general path, static decoder): the decoder takes decode steps (a token, maybe with
        the drafts it verifies: one row each, all on the session's slot) while their rows fit
        its largest bucket; prefills, replays and steps asking for full logits go the general
        way."""
        general, decode, rows = [], [], 0
        limit = loaded.decoder.max_rows if loaded.decoder is not None else 0
        for job, session in admitted:
            step = job.step
            n = len(step.token_ids)
            if n == step.draft_tokens + 1 and not step.return_logits and rows + n <= limit:
                decode.append((job, session))
                rows += n
            else:
                general.append((job, session))
        return general, decode

    def _decode(self, loaded: LoadedRange, decode: Admitted) -> torch.Tensor:
        """The decode steps through the static decoder: every input token a row."""
        steps = [job.step for job, _ in decode]
        slots, positions, tokens = [], [], []
        for step, (_, session) in zip(steps, decode, strict=True):
            n = len(step.token_ids)
            slots += [session.slot] * n
            positions += range(step.start_pos, step.start_pos + n)
            tokens += step.token_ids
        return loaded.decoder.run(slots, positions, tokens, self._incoming_hidden(loaded, steps))

    def _run_general(self, loaded: LoadedRange, general: Admitted) -> torch.Tensor:
        """The general path (prefills, replays, full logits): one segment per session. Returns
        the hidden rows of every token, or logits: every row's when asked, else one per job."""
        segments, row = [], 0
        for job, session in general:
            n = len(job.step.token_ids)
            segments.append(
                Segment(slice(row, row + n), job.step.start_pos, session.kv, session.slot)
            )
            row += n
        steps = [job.step for job, _ in general]
        ids = torch.tensor([t for s in steps for t in s.token_ids], device=self.holder.device)
        all_logits = steps[0].return_logits  # such a step runs alone (batcher)
        hidden = self._incoming_hidden(loaded, steps)
        if hidden is not None:
            hidden = hidden.to(self.holder.device)
        tails = [s.draft_tokens + 1 for s in steps]
        return loaded.model.run(segments, ids, hidden, all_logits, tails, loaded.cache.pool)

    @staticmethod
    def _incoming_hidden(loaded: LoadedRange, steps: list[StepInput]) -> torch.Tensor | None:
        """The steps' incoming hidden rows, on the host (None on the first stage)."""
        if loaded.model.weights.is_first:
            return None
        return torch.cat([s.hidden for s in steps])

    def _hidden_outputs(
        self, loaded: LoadedRange, admitted: Admitted, result: torch.Tensor
    ) -> list[StepOutput | Exception]:
        """A middle stage: each job's hidden rows, on the host; a job whose rows are not finite
        (an overflow inside the range) fails rather than pass NaN or Inf on."""
        rows = result.cpu()  # one copy for the batch; the graph's output is reused
        finite = finite_rows(rows)
        outputs: list[StepOutput | Exception] = []
        row = 0
        for job, _ in admitted:
            n = len(job.step.token_ids)
            if all(finite[row : row + n]):
                outputs.append(StepOutput(hidden=rows[row : row + n]))
            else:
                outputs.append(self._non_finite(loaded, "hidden state"))
            row += n
        return outputs

    def _sample(
        self, loaded: LoadedRange, admitted: Admitted, logits: torch.Tensor
    ) -> list[StepOutput | Exception]:
        """The last stage: each session's next token from its logits rows: its last row, or
        with drafted tokens its last draft_tokens + 1 rows, whose picks verify the drafts."""
        steps = [job.step for job, _ in admitted]
        full = steps[0].return_logits  # then it is the batch's only step, every row its own
        rows = RowInputs()
        for step, (_, session) in zip(steps, admitted, strict=True):
            session.seen_tokens.extend(step.token_ids)
            add_rows(
                rows,
                session.seen_tokens,
                step.start_pos,
                len(step.token_ids),
                step.draft_tokens,
                step.sampling,
                self.holder.device,
            )
        decided = logits[-(steps[0].draft_tokens + 1) :] if full else logits
        picked = sample_rows(decided, rows.params, rows.seen, rows.generators, self.batch_invariant)
        outputs: list[StepOutput | Exception] = []
        row = 0
        for step in steps:
            n = step.draft_tokens + 1
            verdict = accept(
                step.token_ids[len(step.token_ids) - step.draft_tokens :], picked[row : row + n]
            )
            row += n
            if isinstance(verdict, NonFiniteLogits):
                outputs.append(self._non_finite(loaded, "logits row"))
            elif isinstance(verdict, Exception):
                outputs.append(verdict)
            else:
                logits_out = logits.cpu() if full else None
                outputs.append(_output(verdict, step.draft_tokens, logits_out))
        return outputs

    def _non_finite(self, loaded: LoadedRange, what: str) -> OutOfRange:
        w = loaded.model.weights
        dtype = str(self.holder.dtype).removeprefix("torch.")
        why = (
            "the weights or the input hold values float32 cannot carry"
            if dtype == "float32"
            else f"an overflow in {dtype}? try --dtype float32"
        )
        return OutOfRange(f"layers {w.span} produced a {what} with NaN or Inf ({why})")


def _output(verdict: Verdict, drafts: int, logits: torch.Tensor | None) -> StepOutput:
    return StepOutput(
        draft_tokens=drafts,
        token_id=verdict.token_id,
        logprob=verdict.logprob,
        logits=logits,
        accepted_drafts=verdict.accepted,
        draft_logprobs=verdict.draft_logprobs,
    )
