"""The generation loop: prefill, decode steps until eos / length / a stop string, streamed text
and timings. Each session's token history lives here (the stages only cache K/V).

A generation stops at its next step when its caller is gone (`cancelled`), and frees its
caches. One that fails for want of a stage, or that is still running when the orchestrator
shuts down, is suspended: its client may resume it by naming its session id (after a restart
too, when the orchestrator keeps a sessions file)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from orchestrator.drafting import DraftSession
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.router import Router
from orchestrator.session_state import GenerationRequest, SessionState
from orchestrator.sessions_file import SessionsFile
from orchestrator.speculation import AdaptiveK, SpeculationPolicy, StepCosts
from orchestrator.step_outcome import DraftsIgnored, StepResult
from orchestrator.tokenizer import Tokenizer
from protos.errors import (
    Cancelled,
    InvalidArgument,
    LlamadistError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from protos.limits import check_session_id
from protos.sampling import Sampling

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_SUSPENDED = 1024  # sessions kept resumable after a stage failure
SUSPEND_TTL_S = 600.0


@dataclass
class Timings:
    ttft_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_ms: float = 0.0
    stage_compute_ms: list[float] = field(default_factory=list)
    stage_mean_batch: list[float] = field(default_factory=list)
    trips: int = 0  # steps through the pipeline (Timings.trips on the wire)
    mesh_overhead_ms: float = 0.0  # mean per step: wall time not spent computing
    hop_overhead_ms: float = 0.0  # mesh_overhead_ms over the number of stages
    replays: int = 0  # caches rebuilt from the token history (after a plan reload)
    drafted_tokens: int = 0  # speculative decoding: tokens drafted and verified
    accepted_tokens: int = 0  # of those, kept
    cohorts: int = 0  # decode batches the scheduler kept in flight at once (at the end)


@dataclass
class Chunk:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    session_id: str
    prompt_tokens: int = 0  # the session's prompt, also when it is resumed
    finish_reason: str = ""  # "", "eos", "length", "stop"
    timings: Timings | None = None


@dataclass(frozen=True)
class Caller:
    """Who makes a request: `id` is what the per-client session cap counts (an API key's hash
    with keys, else the peer's host); `owns_all` callers may resume or end any session (no keys
    configured, or an admin key), the others only the sessions their key started."""

    id: str = ""
    owns_all: bool = True

    def may_touch(self, owner: str) -> bool:
        return self.owns_all or owner == self.id


@dataclass
class Running:
    """A generation in progress, as EndSession and a shutdown see it."""

    owner: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    freed_bytes: int = 0


class TextStream:
    """Turns a growing list of token ids into text that is final: nothing is emitted that a later
    token could change (an incomplete UTF-8 character) or that may begin a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.emitted = 0

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """Returns (new final text, whether a stop string was hit)."""
        text = self.tokenizer.decode(ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                return self._emit(text[:at]), True
        safe = text.rstrip("\ufffd")
        hold = max(
            (k for s in self.stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0
        )
        return self._emit(safe[: len(safe) - hold]), False

    def flush(self, ids: list[int]) -> str:
        return self._emit(self.tokenizer.decode(ids))

    def _emit(self, text: str) -> str:
        new = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return new


class Generator:
    def __init__(
        self,
        router: Router,
        tokenizer: Tokenizer,
        vocab_size: int,
        max_positions: int,
        max_sessions_per_client: int,
        sessions_file: str = "",
        speculation: SpeculationPolicy | None = None,
        metrics: OrchestratorMetrics | None = None,
    ):
        self.router = router
        self.speculation = speculation or SpeculationPolicy()
        self.step_costs = StepCosts()  # decode steps by rows, for every session's AdaptiveK
        self.drafts_ignored = ""  # why drafting stopped: a stage that does not verify drafts
        self.sessions = SessionsFile(sessions_file) if sessions_file else None
        self.max_sessions_per_client = max_sessions_per_client
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.metrics = metrics
        self._active: dict[str, Running] = {}
        self._suspended: dict[str, SessionState] = {}  # failed for want of a stage; resumable
        self._lock = threading.Lock()
        self.shutting_down = False
        if self.sessions is not None:
            self._suspended = self.sessions.load(SUSPEND_TTL_S)

    def validate(self, req: GenerationRequest) -> None:
        if req.session_id:
            check_session_id(req.session_id)
        if not req.prompt_ids:
            raise InvalidArgument("the prompt is empty")
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgument(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        if req.max_new_tokens <= 0:
            raise InvalidArgument(f"max_new_tokens must be positive, got {req.max_new_tokens}")
        total = len(req.prompt_ids) + req.max_new_tokens
        if total > self.max_positions:
            raise InvalidArgument(
                f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens ({req.max_new_tokens}) = "
                f"{total} exceeds the {self.max_positions} tokens a session may reach (the "
                "model's context, or the stages' --max-context)"
            )
        if req.stop and self.tokenizer.hf is None:
            raise InvalidArgument("stop strings need a tokenizer; this model has none")
        if len(req.stop) > MAX_STOP_STRINGS or any(
            not 0 < len(s) <= MAX_STOP_LEN for s in req.stop
        ):
            raise InvalidArgument(
                f"give at most {MAX_STOP_STRINGS} stop strings of 1 to {MAX_STOP_LEN} characters"
            )
        Sampling.from_pb(req.sampling)  # raises InvalidArgument on bad parameters
        self.speculation.mode(req.speculate)  # unknown or unavailable: refused here

    def end(self, session_id: str, caller: Caller, timeout_s: float = 30.0) -> int:
        """Ends a session: a running generation is cancelled and frees its caches itself (so no
        step runs against freed caches); otherwise the stages free what they hold."""
        with self._lock:
            running = self._active.get(session_id)
            suspended = self._suspended.get(session_id)
            owner = running.owner if running else suspended.owner if suspended else None
            if owner is not None and not caller.may_touch(owner):
                raise PermissionDenied(f"session {session_id!r} belongs to another API key")
            was_suspended = self._suspended.pop(session_id, None) is not None
        if running is None:
            try:
                return self.router.end_session(session_id)
            except NotFound:
                if was_suspended:
                    return 0  # it was known, and its stages had lost it already
                raise
        running.cancelled.set()
        running.done.wait(timeout_s)
        return running.freed_bytes

    def is_suspended(self, session_id: str) -> bool:
        with self._lock:
            self._expire_suspended()
            return session_id in self._suspended

    def _expire_suspended(self) -> None:
        now = time.monotonic()
        for sid in [
            s for s, st in self._suspended.items() if now - st.suspended_at > SUSPEND_TTL_S
        ]:
            del self._suspended[sid]

    def run(
        self,
        req: GenerationRequest,
        caller: Caller | None = None,
        cancelled: threading.Event | None = None,
    ) -> Iterator[Chunk]:
        """Generates; a request naming a suspended session resumes it (its first chunk repeats
        what was generated before the failure, so a resumed call returns the whole answer).
        A client (`caller.id`) runs at most max_sessions_per_client. The generation stops at
        its next step once `cancelled` is set (its caller is gone). Counted by `metrics`
        (orchestrator/metrics.py) where there are any, refusals included; its prompt tokens
        only once it is admitted."""
        chunks = self._run(req, caller, cancelled)
        if self.metrics is not None:
            chunks = self.metrics.observe(chunks, len(req.prompt_ids))
        yield from chunks

    def _run(
        self, req: GenerationRequest, caller: Caller | None, cancelled: threading.Event | None
    ) -> Iterator[Chunk]:
        caller = caller or Caller()
        running = Running(owner=caller.id, cancelled=cancelled or threading.Event())
        with self._lock:
            if self.shutting_down:
                raise Unavailable("the orchestrator is shutting down; retry on another one")
            state = self._suspended.get(req.session_id) if req.session_id else None
            if state is not None and not caller.may_touch(state.owner):
                raise PermissionDenied(f"session {req.session_id!r} belongs to another API key")
            if state is None:
                self.validate(req)
                session_id = req.session_id or uuid.uuid4().hex
                state = SessionState(dataclasses.replace(req, session_id=session_id), caller.id)
            session_id = state.req.session_id
            if session_id in self._active:
                raise InvalidArgument(f"session {session_id!r} is already generating")
            mine = sum(r.owner == caller.id for r in self._active.values())
            if mine >= self.max_sessions_per_client:
                raise ResourceExhausted(
                    f"this client already runs {mine} sessions, the limit per client; "
                    "wait for one to finish"
                )
            self._suspended.pop(session_id, None)
            self._active[session_id] = running
        if self.metrics is not None:
            self.metrics.admitted(len(req.prompt_ids))
        try:
            yield from self._loop(state, running.cancelled)
        except (Unavailable, Cancelled) as err:
            if not isinstance(err, Unavailable) and not self.shutting_down:
                raise  # ended by its caller or by EndSession: nothing to resume
            with self._lock:
                self._expire_suspended()
                if len(self._suspended) < MAX_SUSPENDED:
                    state.suspended_at = time.monotonic()
                    self._suspended[session_id] = state
            why = "the orchestrator is shutting down" if self.shutting_down else str(err)
            raise Unavailable(f"{why}; resume with session_id {session_id!r}") from None
        finally:
            # Nothing cached, or a stage is down: the stage's TTL reclaims the rest.
            with contextlib.suppress(LlamadistError):
                running.freed_bytes = self.router.end_session(session_id)
            with self._lock:
                del self._active[session_id]
            running.done.set()

    def shut_down(self, deadline: float) -> int:
        """Stops taking generations, lets those running finish until shortly before `deadline`
        (time.monotonic()), then suspends the rest (their clients get UNAVAILABLE with the
        session id to resume) and saves every suspended session to the sessions file, if any.
        Returns how many were suspended by the shutdown."""
        with self._lock:
            self.shutting_down = True
        margin = min(1.0, max(0.0, deadline - time.monotonic()) / 4)  # time to suspend and save
        while time.monotonic() < deadline - margin:
            with self._lock:
                running = list(self._active.values())
            if not running:
                break
            running[0].done.wait(0.05)
        with self._lock:
            running = list(self._active.values())
        for r in running:
            r.cancelled.set()
        for r in running:
            r.done.wait(max(0.0, deadline - time.monotonic()))
        if self.sessions is not None:
            with self._lock:
                self._expire_suspended()
                self.sessions.save(self._suspended)
        return len(running)

    def _loop(self, state: SessionState, cancelled: threading.Event) -> Iterator[Chunk]:
        req = state.req
        drafts = self.speculation.session(self.speculation.mode(req.speculate), req.prompt_ids)
        try:
            yield from self._steps(state, cancelled, drafts)
        finally:
            if drafts is not None:
                drafts.close()

    def _steps(
        self, state: SessionState, cancelled: threading.Event, drafts: DraftSession | None
    ) -> Iterator[Chunk]:
        """Steps until the generation finishes. With a drafter, a step also carries the
        tokens it guesses (AdaptiveK says how many); the stages keep the guesses the model
        agrees with, and those join the history (a replay sends kept tokens only)."""
        req, session_id = state.req, state.req.session_id
        t_start = time.perf_counter()
        text = TextStream(self.tokenizer, req.stop)
        generated = state.generated
        steps: list[StepResult] = []
        adaptive = AdaptiveK(self.speculation.k, self.step_costs)
        history, step_input = [], list(req.prompt_ids)  # history: tokens the stages have cached
        if generated:  # resuming: repeat what came before, then replay it onto the stages
            history, step_input = req.prompt_ids + generated[:-1], generated[-1:]
            yield Chunk(
                list(generated),
                list(state.logprobs),
                text.push(generated)[0],
                session_id,
                len(req.prompt_ids),
            )
        cached_epoch = 0  # nothing cached yet
        first_token_at = t_start
        produced, first_step_tokens = 0, 0
        stop_ids = frozenset() if req.ignore_eos else frozenset(self.tokenizer.eos_ids)
        while True:
            if cancelled.is_set():
                raise Cancelled(f"session {session_id!r} was ended")
            draft = self._draft(drafts, adaptive, history + step_input, req, len(generated))
            stream = None
            if not draft and len(step_input) == 1 and self.router.can_stream(cached_epoch):
                # the scheduler loop makes this session's steps until it ends the stream
                stream = self.router.decode(
                    session_id, len(history), step_input[0], req.sampling, cached_epoch,
                    req.max_new_tokens - len(generated), stop_ids,
                    lambda: not self._wants_drafts(drafts), cancelled,
                )  # fmt: skip
                results = iter(stream)
            else:
                result, draft = self._one_step(state, history, step_input, cached_epoch, cancelled,
                                               draft)  # fmt: skip
                results = iter([result])
            try:
                for result in results:
                    steps.append(result)
                    kept = draft[: result.accepted_drafts]
                    decode = len(step_input) == 1 and not result.replayed  # a step to time
                    adaptive.record(len(draft), len(kept), result.wall_ns / 1e6 if decode else None)
                    history += step_input + kept
                    cached_epoch = result.epoch
                    chunk = self._chunk(state, text, kept, result)
                    produced += len(chunk.token_ids)
                    if len(steps) == 1:
                        first_token_at = time.perf_counter()
                        first_step_tokens = produced
                    if chunk.finish_reason:
                        chunk.timings = self._timings(
                            steps, t_start, first_token_at, produced - first_step_tokens, adaptive
                        )
                        yield chunk
                        return
                    yield chunk
                    step_input = [result.token_id]
            finally:
                if stream is not None:
                    results.close()
            if stream is not None and stream.lost_cache:
                cached_epoch = 0  # the next step replays the history

    def _one_step(self, state, history, step_input, cached_epoch, cancelled, draft):
        """One step through Router.step (prefill, replay, drafts): (its result, the drafts it
        carried: none when the stages turned out not to verify drafts)."""
        req = state.req
        try:
            result = self.router.step(
                req.session_id, history, step_input, req.sampling, cached_epoch, cancelled, draft
            )
        except DraftsIgnored as err:
            log.warning("speculation off until a restart: %s", err)
            self.drafts_ignored = str(err)
            draft = []
            result = self.router.step(
                req.session_id, history, step_input, req.sampling, cached_epoch, cancelled
            )
        return result, draft

    def _chunk(self, state: SessionState, text: TextStream, kept: list[int], result) -> Chunk:
        """The chunk of a step's new tokens (the kept drafts, then the sampled one), up to
        where the generation finishes."""
        req = state.req
        new_ids = [*kept, result.token_id]
        new_logprobs = [*result.draft_logprobs[: len(kept)], result.logprob]
        chunk = Chunk([], [], "", req.session_id, len(req.prompt_ids))
        for token, logprob in zip(new_ids, new_logprobs, strict=True):
            state.generated.append(token)
            state.logprobs.append(logprob)
            chunk.token_ids.append(token)
            chunk.logprobs.append(logprob)
            chunk.finish_reason, new_text = self._finish(text, state.generated, req)
            chunk.text += new_text
            if chunk.finish_reason:
                break
        return chunk

    def _wants_drafts(self, drafts: DraftSession | None) -> bool:
        """Whether the session would draft now (then it makes its own steps again)."""
        return (
            drafts is not None
            and not self.drafts_ignored
            and len(self._active) <= self.speculation.max_sessions
        )

    def _draft(
        self,
        drafts: DraftSession | None,
        adaptive: AdaptiveK,
        tokens: list[int],
        req: GenerationRequest,
        generated: int,
    ) -> list[int]:
        """The tokens the next step carries as guesses (none when the session does not
        speculate, or when more sessions decode together than speculation pays for)."""
        if not self._wants_drafts(drafts):
            return []
        k = adaptive.next_k(req.max_new_tokens - generated)
        return drafts.propose(tokens, k)[:k] if k > 0 else []

    def _finish(
        self, text: TextStream, generated: list[int], req: GenerationRequest
    ) -> tuple[str, str]:
        """After a token: (finish reason or '', the text that became final)."""
        finish = ""
        new_text, stopped = text.push(generated)
        if stopped:
            finish = "stop"
        elif generated[-1] in self.tokenizer.eos_ids and not req.ignore_eos:
            finish = "eos"
        elif len(generated) >= req.max_new_tokens:
            finish = "length"
        if finish and not stopped:
            new_text += text.flush(generated)
        return finish, new_text

    def _timings(
        self,
        steps: list[StepResult],
        t_start: float,
        first_at: float,
        later_tokens: int,
        adaptive: AdaptiveK,
    ) -> Timings:
        """later_tokens: the tokens produced after the first step."""
        now = time.perf_counter()
        n_stages = len(steps[-1].stage_ns)  # a reload may have changed it: count the last plan's
        same = [s for s in steps if len(s.stage_ns) == n_stages]
        compute_ns = [sum(s.stage_ns[i] for s in same) for i in range(n_stages)]
        batched = [s for s in same if len(s.stage_batch) == n_stages]
        mean_batch = [
            sum(s.stage_batch[i] for s in batched) / len(batched) if batched else 0.0
            for i in range(n_stages)
        ]
        overhead_ms = sum(s.wall_ns - sum(s.stage_ns) for s in steps) / 1e6 / len(steps)
        decode_s = now - first_at
        return Timings(
            ttft_ms=(first_at - t_start) * 1e3,
            decode_tokens_per_s=later_tokens / decode_s if later_tokens and decode_s > 0 else 0.0,
            total_ms=(now - t_start) * 1e3,
            stage_compute_ms=[ns / 1e6 for ns in compute_ns],
            stage_mean_batch=mean_batch,
            trips=len(steps),
            mesh_overhead_ms=overhead_ms,
            hop_overhead_ms=overhead_ms / n_stages,
            replays=sum(s.replayed for s in steps),
            drafted_tokens=adaptive.drafted,
            accepted_tokens=adaptive.accepted,
            cohorts=len(self.router.scheduler.cohorts),
        )
