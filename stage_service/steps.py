"""What a stage step is: its input and output (and their protobuf forms), and what makes an
input valid for the range in force (checked before it is queued)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protos import codec
from protos import llamadist_pb2 as pb
from protos.errors import FailedPrecondition, InvalidArgument
from protos.limits import MAX_BATCH_BYTES, MAX_DRAFT_TOKENS, check_session_id
from protos.sampling import Sampling
from protos.shared.model_files import LlamaArgs
from stage_service.model import RangeWeights


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

    @classmethod
    def from_pb(cls, request: pb.StepRequest, rows: torch.Tensor | None = None) -> StepInput:
        """`rows`: the step's hidden rows when its message carried them (StepBatch.hidden)."""
        if request.HasField("hidden"):
            if rows is not None:
                raise InvalidArgument(
                    "a step with a hidden state of its own in a StepBatch that carries its "
                    "steps' hidden rows: send one or the other"
                )
            rows = codec.from_pb(request.hidden)
        return cls(
            session_id=request.session_id,
            plan_epoch=request.plan_epoch,
            start_pos=request.start_pos,
            token_ids=list(request.token_ids),
            hidden=rows,
            sampling=Sampling.from_pb(request.sampling),
            return_logits=request.return_logits,
            draft_tokens=request.draft_tokens,
        )


@dataclass
class StepOutput:
    hidden: torch.Tensor | None = None
    token_id: int = 0
    logprob: float = 0.0
    logits: torch.Tensor | None = None
    compute_ns: int = 0
    batch_size: int = 1  # sessions in the batch this step ran in
    draft_tokens: int = 0  # a verify step: the drafts it verified (echoed on the wire)
    accepted_drafts: int = 0  # a verify step: drafted tokens kept before token_id
    draft_logprobs: list[float] = field(default_factory=list)

    def to_pb(self, **fields) -> pb.StepReply:
        """The reply, with `fields` of the step's own (its request id, its route's timings)."""
        reply = pb.StepReply(
            **fields,
            token_id=self.token_id,
            logprob=self.logprob,
            compute_ns=self.compute_ns,
            batch_size=self.batch_size,
            draft_tokens=self.draft_tokens,
            accepted_drafts=self.accepted_drafts,
            draft_logprobs=self.draft_logprobs,
        )
        if self.hidden is not None:
            reply.hidden.CopyFrom(codec.to_pb(self.hidden))
        if self.logits is not None:
            reply.logits.CopyFrom(codec.to_pb(self.logits))
        return reply


def check_step(
    step: StepInput, epoch: int, weights: RangeWeights, args: LlamaArgs, dtype: torch.dtype
) -> None:
    """A step the range in force (`weights`, loaded under plan `epoch`) can run, or the
    precise reason it cannot (InvalidArgument, FailedPrecondition for another epoch). Its
    hidden state's values are checked apart, for a batch at once (non_finite)."""
    check_session_id(step.session_id)
    if step.plan_epoch != epoch:
        raise FailedPrecondition(
            f"step is for plan epoch {step.plan_epoch}, this stage serves epoch {epoch}"
        )
    if step.start_pos < 0:
        raise InvalidArgument(f"start_pos must be >= 0, got {step.start_pos}")
    if not step.token_ids:
        raise InvalidArgument("a step needs at least one token id")
    vocab = args.vocab_size
    bad = [t for t in step.token_ids if not 0 <= t < vocab]
    if bad:
        raise InvalidArgument(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    if not 0 <= step.draft_tokens <= min(MAX_DRAFT_TOKENS, len(step.token_ids) - 1):
        raise InvalidArgument(
            f"draft_tokens must be in [0, {MAX_DRAFT_TOKENS}] and below the step's "
            f"{len(step.token_ids)} token ids (a drafted token follows an input token), "
            f"got {step.draft_tokens}"
        )
    check_reply_size(step, weights.is_last, args, dtype)
    if weights.is_first:
        if step.hidden is not None:
            raise InvalidArgument("the first stage takes token ids, not a hidden state")
        return
    expected = (len(step.token_ids), args.hidden_size)
    if step.hidden is None:
        raise InvalidArgument(f"stage for layers {weights.span.start}.. needs a hidden state")
    if tuple(step.hidden.shape) != expected or step.hidden.dtype != dtype:
        raise InvalidArgument(
            f"hidden state must be {list(expected)} {dtype}, got "
            f"{list(step.hidden.shape)} {step.hidden.dtype}"
        )


def batch_rows(batch: pb.StepBatch) -> list[torch.Tensor | None]:
    """Each step's share of the batch's hidden rows (views of one tensor; None for all when the
    batch carries none). A tensor that does not decode, or whose rows are not its steps' token
    count, is InvalidArgument."""
    if not batch.HasField("hidden"):
        return [None] * len(batch.steps)
    rows = codec.from_pb(batch.hidden)
    counts = [len(step.token_ids) for step in batch.steps]
    if rows.dim() != 2 or rows.shape[0] != sum(counts):
        raise InvalidArgument(
            f"StepBatch.hidden must be [{sum(counts)}, hidden_size], a row per token id of "
            f"its steps; got {list(rows.shape)}"
        )
    return list(rows.split(counts))


def finite_rows(rows: torch.Tensor) -> list[bool]:
    """Which rows of a [n, width] tensor hold only finite values. NaN and Inf carry through a
    sum, so a row whose float32 sum is finite is; only the others (or a sum that overflowed)
    are checked value by value: one op over the batch instead of one per row (~35 us each)."""
    finite = torch.isfinite(rows.sum(dim=-1, dtype=torch.float32))
    if bool(finite.all()):
        return [True] * rows.shape[0]
    suspect = (~finite).nonzero().flatten()
    finite[suspect] = torch.isfinite(rows[suspect]).all(dim=-1)
    return finite.tolist()


def non_finite(steps: list[StepInput]) -> list[bool]:
    """Which of these steps (checked by check_step: hidden None or [n, hidden_size]) have a
    hidden state that holds NaN or Inf, checked for them all at once."""
    held = [s.hidden for s in steps if s.hidden is not None]
    if not held:
        return [False] * len(steps)
    finite, row, bad = finite_rows(torch.cat(held)), 0, []
    if all(finite):
        return [False] * len(steps)
    for step in steps:
        n = 0 if step.hidden is None else step.hidden.shape[0]
        bad.append(not all(finite[row : row + n]))
        row += n
    return bad


def check_reply_size(step: StepInput, is_last: bool, args: LlamaArgs, dtype: torch.dtype) -> None:
    """A step whose answer (hidden rows, or float32 logits when asked) could not fit in one
    message is refused before any work."""
    n = len(step.token_ids)
    if is_last:
        row_bytes = args.vocab_size * 4 if step.return_logits else 0
    else:
        row_bytes = args.hidden_size * dtype.itemsize
    if n * row_bytes > MAX_BATCH_BYTES:
        raise InvalidArgument(
            f"a step of {n} tokens would answer {n * row_bytes:,} bytes, over the "
            f"{MAX_BATCH_BYTES:,}-byte message limit: send at most "
            f"{MAX_BATCH_BYTES // row_bytes} tokens per step"
        )
