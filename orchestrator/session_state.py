"""A session as the generator and the sessions file both hold it: its request
(`GenerationRequest`) and what it generated so far (`SessionState`), enough to resume it."""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import llamadist_pb2 as pb
from protos.limits import DEFAULT_MAX_NEW_TOKENS


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: pb.SamplingParams = field(default_factory=pb.SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    session_id: str = ""
    speculate: str = ""  # off, lookup, draft; '' = the orchestrator's default


@dataclass
class SessionState:
    """What a generation has produced so far: enough to resume it after a stage failure."""

    req: GenerationRequest
    owner: str = ""  # Caller.id of the client that started it
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    suspended_at: float = 0.0
