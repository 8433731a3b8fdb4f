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
    def from_pb(cls, request: pb.StepRequest) -> StepInput:
        return cls(
            session_id=request.session_id,
            plan_epoch=request.plan_epoch,
            start_pos=request.start_pos,
            token_ids=list(request.token_ids),
            hidden=codec.from_pb(request.hidden) if request.HasField("hidden") else None,
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

    def to_pb(self) -> pb.StepReply:
        reply = pb.StepReply(
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
    precise reason it cannot (InvalidArgument, FailedPrecondition for another epoch)."""
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
    if not torch.isfinite(step.hidden).all():
        raise InvalidArgument("hidden state contains NaN or Inf")


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
