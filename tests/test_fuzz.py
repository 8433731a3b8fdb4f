"""Fuzz every RPC of both services (issue 5) against real processes: a 2-stage LocalMesh on a tiny
random model that has the default model's tokenizer, vocabulary and chat template, so prompts,
chats and stop strings are tokenized, templated and decoded for real. Hypothesis sends random
well-formed messages (random strings, huge and negative numbers, NaN floats, random token ids,
tensors of random shape, dtype and data, a random oneof choice, random prompts, chats and stop
strings) and mutated bytes of valid requests (bit flips, truncation, insertion, deletion, stray
fields), at the raw gRPC level, to the orchestrator and to each stage directly.

ForwardStream gets random and mutated StepBatch messages of up to 5 steps; each step's own status
(in its reply) counts too ("Stage.ForwardStream steps" in the summary).

Every answer is judged: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED,
OUT_OF_RANGE and PERMISSION_DENIED are refusals; bytes that are not a valid message must be
INVALID_ARGUMENT; no call may go past its deadline (a hang fails); UNAVAILABLE is accepted only
where the fuzz itself made a stage unreachable: a Generate while a fuzzed LoadLayers or ReloadPlan
has left the orchestrator's plan without its layers (checked against the stages' Info after each
of those calls), or a plan request naming an address that is not a stage. Anything else
(INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, ...) fails, as does a process that died. The layout is
restored (a ReloadPlan, which plans above every epoch the stages hold) after most LoadLayers and
ReloadPlan blocks, so that the other RPCs mostly run on a working mesh.

The run is replayable: the seed comes from LLAMADIST_FUZZ_SEED (else random), is printed at the
start and in every failure, and fixes the block order and each block's hypothesis seed; the
summary prints a digest of the request sequence (ports and server-made session ids aliased).
Afterwards a valid request is served correctly: the layout restored, a greedy Generate equals
transformers' own. A summary of the statuses per RPC is printed (`-s`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import hypothesis
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from client.client import Client
from client.launcher import LocalMesh
from protos import llamadist_pb2 as pb
from protos.shared.serving import GRPC_OPTIONS
from protos.shared.stage_auth import load_stage_key, stage_channel
from tests.conftest import make_tokenizer_model, reference_greedy

pytestmark = pytest.mark.slow

# The tiny model: 4 layers, hidden size 64, context 256, and the default model's (SmolLM2's)
# tokenizer: its vocabulary of 49152 (checked against the default model's config), bos 1, eos 2.
VOCAB, HIDDEN, LAYERS, CONTEXT = 49152, 64, 4, 256
DEADLINE_S = 5.0  # every fuzzed call; past it the call fails as a hang
# Plan requests: the orchestrator itself waits up to 5 s for a stage that does not answer (a junk
# address) and then answers UNAVAILABLE naming it; give it the time to say so.
PLAN_DEADLINE_S = 12.0
TOTAL_REQUESTS = 4100  # README: "the fuzz test sends 4,000 random and mutated requests"
MIN_TOTAL = 4000
MIN_PER_RPC = 120  # the lightest RPC (weight 4 of 108) gets 156
MIN_SERVED_PER_RPC = 5  # and each is served now and then (SERVED_CODE): past the refusals
# What shows that a request got past the refusals: OK, except where one call after another
# cannot get there. The orchestrator's sessions end with their generation, so EndSession has
# nothing left to end: NOT_FOUND shows that a valid id was looked up.
SERVED_CODE = {"Orchestrator.EndSession": "NOT_FOUND"}
MIN_INVALID_BYTES_PER_RPC = 20  # bytes that are not a valid message, refused INVALID_ARGUMENT
# Generate(Stream) answered OK for a prompt, a chat, with stop strings. Each count follows the
# seed's mix of requests and layouts: 15-45 were seen, and a floor of 30 failed on two seeds
# (2133437349, 715436784) although every path had been exercised; 10 still shows that each path
# got past the refusals many times.
MIN_TOKENIZER_OK = 10
MIN_STOPPED = 15  # generations that ended at a stop string
ROUNDS = 6
RESTORE_P = 0.75  # after a LoadLayers / ReloadPlan block, how often the layout is restored
# Refusals and answers; UNAVAILABLE only in the cases `unreachable_reason` names.
ACCEPTED = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "OUT_OF_RANGE",
    "PERMISSION_DENIED",
}
# A LoadLayers carried out under an epoch this close to the last one leaves no room for the plans
# that must follow it (the orchestrator says: restart the stages): the fuzz does not send those.
WEDGING_EPOCH = 2**64 - 2**32
PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
SERVER_SESSION = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: a session id the orchestrator made

# (service, method, request type, reply type, weight): how often each RPC is picked.
RPCS = [
    ("Stage", "Forward", pb.StepRequest, pb.StepReply, 18),
    ("Stage", "ForwardStream", pb.StepBatch, pb.StepBatchReply, 12),
    ("Stage", "EndSession", pb.EndSessionRequest, pb.EndSessionReply, 6),
    ("Stage", "Info", pb.InfoRequest, pb.StageInfo, 4),
    ("Stage", "LoadLayers", pb.LoadLayersRequest, pb.StageInfo, 6),
    ("Stage", "Health", pb.HealthRequest, pb.HealthReply, 4),
    ("Orchestrator", "Generate", pb.GenerateRequest, pb.GenerateReply, 16),
    ("Orchestrator", "GenerateStream", pb.GenerateRequest, pb.GenerateChunk, 12),
    ("Orchestrator", "EndSession", pb.EndSessionRequest, pb.EndSessionReply, 6),
    ("Orchestrator", "GetPlan", pb.GetPlanRequest, pb.Plan, 4),
    ("Orchestrator", "ListStages", pb.ListStagesRequest, pb.ListStagesReply, 4),
    ("Orchestrator", "PreviewPlan", pb.PlanRequest, pb.Plan, 6),
    ("Orchestrator", "ReloadPlan", pb.PlanRequest, pb.Plan, 6),
    ("Orchestrator", "Health", pb.HealthRequest, pb.HealthReply, 4),
]
REQUEST_TYPES = {f"{s}.{m}": req for s, m, req, *_ in RPCS}


def fuzz_seed() -> int:
    value = os.environ.get("LLAMADIST_FUZZ_SEED", "")
    return int(value) if value else random.SystemRandom().randrange(2**32)


# ---------------------------------------------------------------------- value strategies


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, picked with the given integer weights."""
    table = [s for w, s in choices for _ in range(w)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


I64 = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -(2**63)]),
    st.integers(-3, CONTEXT + 3),
)
U64 = st.one_of(
    st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 10)
)
I32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]),
    st.integers(-3, 10),
)
F32 = st.one_of(
    st.floats(width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 3.4e38, float("nan"), float("inf")]),
)
# Text that means something to the tokenizer or the chat template (special tokens, Jinja).
SPECIAL_TEXT = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>assistant\n",
    "{{ messages }}",
    "{% for m in messages %}{{ m }}{% endfor %}",
    "{{ raise_exception('x') }}",
    "\ufffd",
    "\r\n\t",
    "Hello, world! What is the capital of France?",
]
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "a" * 129, "é", "\U0001d11e", "../../etc", "%s%n{}"]),
    st.sampled_from(SPECIAL_TEXT),
)
PROMPT_TEXT = weighted(
    (6, TEXT),
    (1, st.integers(1, 200).map(lambda n: "the cat sat. " * n)),  # up to ~800 tokens
    (1, st.text(min_size=200, max_size=600)),
)
# Fragments that random text often contains, so stop strings are hit; and the limits (16 strings
# of 1 to 256 characters).
STOP = weighted(
    (4, st.just([])),
    (3, st.lists(st.sampled_from(["e", " ", "a", "\n", ".", "the", "in", "\ufffd"]), max_size=3)),
    (1, st.lists(TEXT, max_size=3)),
    (1, st.sampled_from([[""], ["a" * 256], ["a" * 257], ["x"] * 16, ["x"] * 17, ["<|im_end|>"]])),
)
SESSION = weighted(
    (3, st.from_regex(r"[A-Za-z0-9._:-]{1,16}", fullmatch=True)),
    (2, st.sampled_from(["s", "fuzz-0", "fuzz-1", "seed-0", "x" * 128, "x" * 129, "a b", "ü"])),
    (1, TEXT),
)
TOKENS = weighted(
    (8, st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24)),
    (1, st.just([])),
    (2, st.lists(st.one_of(st.integers(-2, VOCAB + 1), I64), max_size=6)),
    (1, st.lists(st.integers(0, VOCAB - 1), min_size=CONTEXT - 8, max_size=CONTEXT + 8)),
)
MAX_NEW_TOKENS = weighted((16, st.integers(1, 8)), (1, st.just(0)), (3, I32))
DTYPE = weighted((6, st.sampled_from([pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16])), (1, I32))
ITEMSIZE = {pb.FLOAT32: 4, pb.BFLOAT16: 2, pb.FLOAT16: 2}
TORCH_DTYPE = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}


@st.composite
def tensors(draw, rows: int | None = None) -> pb.Tensor:
    """Random shape, dtype and data; often the shape a stage expects, with finite values or a
    NaN, an Inf or huge values, sometimes a byte length that does not match."""
    dtype = draw(DTYPE)
    if rows is not None and draw(st.integers(0, 2)):
        shape = [rows, HIDDEN]
    else:
        shape = draw(st.lists(st.one_of(st.integers(-2, 80), I64), max_size=4))
    msg = pb.Tensor(shape=shape, dtype=dtype)
    numel = 1
    for d in shape:
        numel *= d
    itemsize = ITEMSIZE.get(dtype, 4)
    if 0 <= numel * itemsize <= 2**20 and draw(st.integers(0, 3)):
        values = torch.randn(numel, generator=torch.Generator().manual_seed(draw(U64) % 2**32))
        poison = draw(st.sampled_from(["", "", "", "nan", "inf", "huge"]))
        if poison and numel:
            at = draw(st.integers(0, numel - 1))
            values[at] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e38}[poison]
        values = values.to(TORCH_DTYPE.get(dtype, torch.float32))
        data = values.view(torch.uint8).numpy().tobytes() if numel else b""
        cut = draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
        msg.data = data[:-1] if cut == -1 else data + b"\0" * cut
    else:
        msg.data = draw(st.binary(max_size=512))
    return msg


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    """Greedy, valid random parameters, or anything (NaN, Inf, negative, huge)."""
    kind = draw(st.sampled_from(["greedy", "valid", "valid", "any"]))
    msg = pb.SamplingParams()
    if kind == "greedy":
        return msg
    valid = {
        "temperature": st.floats(0.0, 2.0, width=32),
        "top_p": st.floats(0.0625, 1.0, width=32),
        "repetition_penalty": st.floats(0.5, 2.0, width=32),
    }
    for name, values in valid.items():
        if draw(st.booleans()):
            setattr(msg, name, draw(values if kind == "valid" else F32))
    if draw(st.booleans()):
        msg.top_k = draw(st.integers(0, VOCAB + 5) if kind == "valid" else I32)
    if draw(st.booleans()):
        msg.seed = draw(U64)
    return msg


def parses(request_type, raw: bytes) -> bool:
    """Whether `raw` is a valid message (as protos/shared/handlers.py parses it)."""
    try:
        request_type.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return False
    return True


def generate_kind(raw: bytes) -> str:
    """Which tokenizer path a GenerateRequest takes: prompt, chat, token_ids (+stop), or none."""
    try:
        msg = pb.GenerateRequest.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return "not a message"
    kind = msg.WhichOneof("input") or "no input"
    return f"{kind} + stop" if msg.stop else kind


# ---------------------------------------------------------------------- the fuzzer


@dataclass
class Fuzzer:
    orchestrator: str
    stages: list[str]
    seed: int
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    epochs: dict[str, int] = field(default_factory=dict)
    sessions: collections.deque = field(default_factory=lambda: collections.deque(maxlen=16))
    stage_sessions: dict[str, collections.deque] = field(default_factory=dict)  # by stage
    counts: dict[str, collections.Counter] = field(default_factory=dict)
    seconds: Counter = field(default_factory=Counter)  # per RPC
    failures: list[str] = field(default_factory=list)
    processes: list = field(default_factory=list)
    stage_key: str | None = None  # sent to the stages: the fuzz is a caller that holds it
    calls: int = 0
    opened: int = 0  # sessions open_sessions made
    layout_broken: str = ""  # why the orchestrator's plan is not what its stages hold, or ""
    broken_calls: int = 0  # calls made while it was not
    unavailable: Counter = field(default_factory=Counter)  # accepted UNAVAILABLE, by reason
    invalid_bytes: Counter = field(default_factory=Counter)  # per RPC
    skipped: Counter = field(default_factory=Counter)
    generate_kinds: dict[str, Counter] = field(default_factory=dict)
    finish_reasons: Counter = field(default_factory=Counter)
    aliases: dict[str, str] = field(default_factory=dict)  # server-made session id -> alias
    digest: Any = field(default_factory=hashlib.sha256)  # of every request sent, in order

    @property
    def replay(self) -> str:
        return f"replay with LLAMADIST_FUZZ_SEED={self.seed}"

    def channel(self, address: str) -> grpc.Channel:
        if address not in self.channels:
            if address in self.stages:
                self.channels[address] = stage_channel(address, key=self.stage_key)
            else:
                self.channels[address] = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        return self.channels[address]

    def unary(self, address: str, path: str, request, reply_type, timeout_s: float = DEADLINE_S):
        call = self.channel(address).unary_unary(path, response_deserializer=reply_type.FromString)
        return call(request.SerializeToString(), timeout=timeout_s)

    def check_layout(self) -> None:
        """The stages' epochs, and whether every replica of the orchestrator's plan holds its
        range under the plan's epoch (`layout_broken` says which does not)."""
        infos = {}
        for address in self.stages:
            try:
                info = self.unary(address, "/llamadist.Stage/Info", pb.InfoRequest(), pb.StageInfo)
            except grpc.RpcError as err:
                self.fail("Stage.Info", address, b"", err.code().name, "(the layout check)")
                continue
            if info.plan_epoch != self.epochs.get(address):
                self.cached(address).clear()  # a new assignment drops every cached session
            self.epochs[address] = info.plan_epoch
            infos[address] = info
        plan = self.unary(
            self.orchestrator, "/llamadist.Orchestrator/GetPlan", pb.GetPlanRequest(), pb.Plan
        )
        broken = []
        for position in plan.stages:
            for address in position.address.split("+"):
                info = infos.get(address)
                holds = (info.layer_start, info.layer_end, info.plan_epoch) if info else None
                wanted = (position.layer_start, position.layer_end, plan.epoch)
                if holds != wanted:
                    broken.append(f"{address} holds {holds}, the plan says {wanted}")
        self.layout_broken = "; ".join(broken)

    def epoch(self, address: str) -> int:
        return self.epochs.get(address, 1)

    def restore(self) -> None:
        """The start-up layout (uniform over both stages) again: the orchestrator's reload plans
        above every epoch the stages hold, so it overrides what the fuzzed LoadLayers loaded."""
        try:
            self.unary(
                self.orchestrator,
                "/llamadist.Orchestrator/ReloadPlan",
                pb.PlanRequest(strategy="uniform", stages=self.stages),
                pb.Plan,
                timeout_s=60,
            )
        except grpc.RpcError as err:
            raise AssertionError(
                f"the layout could not be restored: {err.code()} {err.details()}; {self.replay}"
            ) from None
        self.check_layout()
        assert not self.layout_broken, f"restored, yet {self.layout_broken}; {self.replay}"

    def open_sessions(self, per_stage: int = 4) -> None:
        """A few sessions cached on each stage that holds layers, for a Stage.EndSession block
        to end (a layout change before it drops every cached one)."""
        for address in self.stages:
            info = self.unary(address, "/llamadist.Stage/Info", pb.InfoRequest(), pb.StageInfo)
            if info.layer_start == info.layer_end:
                continue  # holds nothing: EndSession is refused FAILED_PRECONDITION
            for _ in range(per_stage):
                step = pb.StepRequest(
                    session_id=f"to-end-{self.opened}", plan_epoch=info.plan_epoch, token_ids=[1]
                )
                if not info.has_embeddings:
                    step.hidden.CopyFrom(
                        pb.Tensor(data=bytes(4 * HIDDEN), shape=[1, HIDDEN], dtype=pb.FLOAT32)
                    )
                self.opened += 1
                try:
                    self.unary(address, "/llamadist.Stage/Forward", step, pb.StepReply)
                except grpc.RpcError as err:
                    detail = f"{err.details()} (a valid step)"
                    raw = step.SerializeToString()
                    self.fail("Stage.Forward", address, raw, err.code().name, detail)
                    continue
                self.cached(address).append(step.session_id)

    # ---- requests

    def plan_stages(self) -> st.SearchStrategy:
        s0, s1 = self.stages
        junk = ["127.0.0.1:1", "no-such-host.invalid:80", self.orchestrator, "[::1]:0", ":", ""]
        return weighted(
            (10, st.just([])),
            (4, st.permutations([s0, s1])),
            (2, st.lists(st.sampled_from([s0, s1]), min_size=1, max_size=3)),
            (1, st.sampled_from([[f"{s0}+{s1}"], [f"{s1}+{s0}"], [s0, f"{s1}+{s1}"]])),
            (1, st.lists(st.sampled_from([s0, s1, *junk]), min_size=1, max_size=2)),
        )

    def well_formed(self, method: str, service: str) -> st.SearchStrategy:
        """(address, request) of random content for one RPC."""
        stage = st.sampled_from(self.stages)
        if service == "Stage":
            if method == "Forward":
                return stage.flatmap(lambda a: st.tuples(st.just(a), self.step_requests(a)))
            if method == "ForwardStream":
                return stage.flatmap(
                    lambda a: st.tuples(
                        st.just(a),
                        st.lists(self.step_requests(a), max_size=5).map(
                            lambda steps: pb.StepBatch(steps=steps)
                        ),
                    )
                )
            if method == "EndSession":
                return stage.flatmap(
                    lambda a: st.tuples(st.just(a), self.end_session_requests(stage=a))
                )
            if method == "LoadLayers":
                return stage.flatmap(lambda a: st.tuples(st.just(a), self.load_requests(a)))
            return st.tuples(stage, st.just(pb.InfoRequest()))  # Info, Health: empty
        here = st.just(self.orchestrator)
        if method in ("Generate", "GenerateStream"):
            return st.tuples(here, self.generate_requests())
        if method == "EndSession":
            return st.tuples(here, self.end_session_requests())
        if method in ("PreviewPlan", "ReloadPlan"):
            return st.tuples(here, self.plan_requests())
        return st.tuples(here, st.just(pb.HealthRequest()))  # GetPlan, ListStages, Health

    def epochs_near(self, address: str) -> st.SearchStrategy:
        current = self.epoch(address)
        return weighted(
            (6, st.just(current)),
            (2, st.sampled_from([0, current + 1, max(current - 1, 0)])),
            (1, U64),
        )

    def load_requests(self, address: str) -> st.SearchStrategy:
        """A range (random, often inside the model) or an explicit hold_nothing, any epoch."""
        bound = weighted((4, st.integers(-1, LAYERS + 1)), (1, I32))
        inside = st.integers(0, LAYERS - 1).flatmap(
            lambda a: st.tuples(st.just(a), st.integers(a + 1, LAYERS))
        )
        current = self.epoch(address)
        epochs = weighted(
            (3, st.just(current)),
            (3, st.just(current + 1)),
            (1, st.sampled_from([0, max(current - 1, 0), current + 2])),
            (1, U64),
        )
        return weighted(
            (2, inside.map(lambda r: pb.LoadLayersRequest(layer_start=r[0], layer_end=r[1]))),
            (2, st.builds(pb.LoadLayersRequest, layer_start=bound, layer_end=bound)),
            (1, st.just(pb.LoadLayersRequest(hold_nothing=True))),
            (1, st.builds(pb.LoadLayersRequest, layer_end=bound, hold_nothing=st.just(True))),
        ).flatmap(
            lambda m: epochs.map(
                lambda e: pb.LoadLayersRequest(
                    layer_start=m.layer_start,
                    layer_end=m.layer_end,
                    hold_nothing=m.hold_nothing,
                    plan_epoch=e,
                )
            )
        )

    def step_requests(self, address: str) -> st.SearchStrategy:
        @st.composite
        def build(draw) -> pb.StepRequest:
            tokens = draw(TOKENS)
            msg = pb.StepRequest(
                session_id=draw(weighted((2, SESSION), (1, self.known_session()))),
                plan_epoch=draw(self.epochs_near(address)),
                start_pos=draw(weighted((4, st.integers(0, 3)), (1, I64))),
                token_ids=tokens,
                return_logits=draw(st.booleans()),
            )
            if draw(st.integers(0, 2)):
                msg.hidden.CopyFrom(draw(tensors(rows=len(tokens))))
            if draw(st.booleans()):
                msg.sampling.CopyFrom(draw(sampling_params()))
            if not draw(st.integers(0, 3)):  # a routed step: forwarded stage to stage
                junk = ["127.0.0.1:1", self.orchestrator, ":", " "]
                msg.route.extend(draw(st.lists(st.sampled_from([*self.stages, *junk]),
                                               min_size=1, max_size=3)))  # fmt: skip
                msg.hop = draw(weighted((4, st.integers(0, len(msg.route) - 1)), (1, I32)))
                msg.origin = draw(st.sampled_from(["", "fuzz"]))
            return msg

        return build()

    def cached(self, address: str) -> collections.deque:
        """Session ids the stage at `address` took a step of and has not ended."""
        return self.stage_sessions.setdefault(address, collections.deque(maxlen=16))

    def known(self, stage: str = "") -> list[str]:
        """Session ids `stage` took a step of, or (no stage) those a Generate answered and those
        any stage took a step of."""
        if stage:
            return list(self.cached(stage)) or ["seed-0"]
        every = [s for a in self.stages for s in self.cached(a)]
        return list(self.sessions) + every or ["seed-0"]

    def known_session(self, stage: str = "") -> st.SearchStrategy:
        """One of known(stage) (the same draws whatever the state, as hypothesis wants)."""
        return st.integers(0, 31).map(lambda i: self.known(stage)[i % len(self.known(stage))])

    def end_session_requests(self, stage: str = "") -> st.SearchStrategy:
        return st.builds(
            pb.EndSessionRequest,
            session_id=weighted((1, SESSION), (2, self.known_session(stage))),
        )

    def generate_requests(self) -> st.SearchStrategy:
        chat = st.lists(
            st.builds(
                pb.ChatMessage,
                role=weighted(
                    (12, st.sampled_from(["system", "user", "assistant"])),
                    (1, st.sampled_from(["tool", "User", ""])),
                    (1, TEXT),
                ),
                content=weighted((4, TEXT), (1, PROMPT_TEXT)),
            ),
            max_size=3,
        )
        # mostly chats of at least one message: an empty chat is always refused, and the
        # coverage floor (MIN_TOKENIZER_OK) needs enough chats that reach the template
        chat = weighted((5, chat.filter(bool)), (1, chat))

        @st.composite
        def build(draw) -> pb.GenerateRequest:
            msg = pb.GenerateRequest(
                max_new_tokens=draw(MAX_NEW_TOKENS),
                stop=draw(STOP),
                ignore_eos=draw(st.booleans()),
            )
            kind = draw(
                weighted(
                    (4, st.just("token_ids")),
                    (3, st.just("prompt")),
                    (3, st.just("chat")),
                    (1, st.just("")),
                )
            )
            if kind == "token_ids":
                msg.token_ids.ids.extend(draw(TOKENS))
            elif kind == "prompt":
                msg.prompt = draw(PROMPT_TEXT)
            elif kind == "chat":
                msg.chat.messages.extend(draw(chat))
            if draw(st.booleans()):
                msg.sampling.CopyFrom(draw(sampling_params()))
            if draw(st.booleans()):
                msg.session_id = draw(st.one_of(SESSION, self.known_session()))
            return msg

        return build()

    def plan_requests(self) -> st.SearchStrategy:
        strategy = weighted(
            (4, st.sampled_from(["", "uniform", "memory", "compute", "mixed", "custom"])),
            (1, TEXT),
        )
        memory = weighted(
            (3, st.just("")),
            (2, st.sampled_from(["4GB", "1KB", "1B", "0GB", "-1GB", "1e400GB", "4GB,8GB", "x"])),
            (1, TEXT),
        )
        bound = st.one_of(st.integers(-1, LAYERS + 1), I32)
        boundaries = weighted(
            (3, st.just("")),
            (
                3,
                st.lists(st.tuples(bound, bound), max_size=3).map(
                    lambda rs: ",".join(f"{a}-{b}" for a, b in rs)
                ),
            ),
            (1, st.sampled_from(["0-1,2-3", "0-3", "0-0,1-3", "0-2,2-3", "3-0", "0-1,,2-3"])),
            (1, TEXT),
        )
        return st.builds(
            pb.PlanRequest,
            strategy=strategy,
            num_partitions=weighted((4, st.integers(-1, 3)), (1, I32)),
            max_memory=memory,
            boundaries=boundaries,
            stages=self.plan_stages(),
        )

    def seeds(self, service: str, method: str) -> list[tuple[str, bytes]]:
        """Valid serialized requests to mutate, with their addresses."""
        s0, s1 = self.stages
        if service == "Stage" and method == "Forward":
            hidden = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
            first = pb.StepRequest(
                session_id="seed-0", plan_epoch=self.epoch(s0), token_ids=[1, 2, 3]
            )
            second = pb.StepRequest(
                session_id="seed-0",
                plan_epoch=self.epoch(s1),
                token_ids=[1, 2, 3],
                hidden=pb.Tensor(
                    data=hidden.view(torch.uint8).numpy().tobytes(),
                    shape=[3, HIDDEN],
                    dtype=pb.FLOAT32,
                ),
                sampling=pb.SamplingParams(temperature=0.8, top_k=5, seed=3),
            )
            return [(s0, first.SerializeToString()), (s1, second.SerializeToString())]
        if service == "Stage" and method == "ForwardStream":
            return [
                (
                    address,
                    pb.StepBatch(steps=[pb.StepRequest.FromString(raw)] * n).SerializeToString(),
                )
                for address, raw in self.seeds("Stage", "Forward")
                for n in (1, 3)
            ]
        if method == "EndSession":
            return [
                (a, pb.EndSessionRequest(session_id=self.known(stage)[-1]).SerializeToString())
                for a, stage in (
                    [(s0, s0), (s1, s1)] if service == "Stage" else [(self.orchestrator, "")]
                )
            ]
        if method == "LoadLayers":  # a retry of what the stage holds, a newer range, a drop
            msgs = [
                (s0, pb.LoadLayersRequest(layer_start=0, layer_end=2, plan_epoch=self.epoch(s0))),
                (s1, pb.LoadLayersRequest(layer_start=2, layer_end=4, plan_epoch=self.epoch(s1))),
                (s1, pb.LoadLayersRequest(layer_start=1, layer_end=4, plan_epoch=self.epoch(s1))),
                (s0, pb.LoadLayersRequest(hold_nothing=True, plan_epoch=self.epoch(s0) + 1)),
            ]
            return [(a, m.SerializeToString()) for a, m in msgs]
        if method in ("Generate", "GenerateStream"):
            msgs = [
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=3),
                pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[5, 6]),
                    max_new_tokens=4,
                    sampling=pb.SamplingParams(temperature=0.7, top_p=0.9, seed=1),
                    ignore_eos=True,
                    session_id="fuzz-gen",
                ),
                pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=6, stop=["e", "."]),
                pb.GenerateRequest(
                    chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="Hi there!")]),
                    max_new_tokens=5,
                ),
            ]
            return [(self.orchestrator, m.SerializeToString()) for m in msgs]
        if method in ("PreviewPlan", "ReloadPlan"):
            msgs = [
                pb.PlanRequest(strategy="uniform"),
                pb.PlanRequest(strategy="custom", boundaries="0-0,1-3"),
                pb.PlanRequest(strategy="memory", max_memory="4GB", num_partitions=2),
            ]
            return [(self.orchestrator, m.SerializeToString()) for m in msgs]
        address = self.orchestrator if service == "Orchestrator" else s0
        return [(address, b""), (s1 if service == "Stage" else address, b"")]

    def mutated(self, service: str, method: str) -> st.SearchStrategy:
        """A valid request, mutated 1-4 times. Every draw is made whatever the seed's bytes (its
        length depends on live state), so hypothesis sees the same choices on every run."""
        ops = ["flip", "flip", "truncate", "insert", "delete", "set", "field", "concat"]
        edit = st.fixed_dictionaries(
            dict(
                op=st.sampled_from(ops),
                at=st.integers(0, 2**16),
                bit=st.integers(0, 7),
                blob=st.binary(min_size=1, max_size=12),
                n=st.integers(1, 8),
                byte=st.sampled_from([0, 0x7F, 0x80, 0xFF]),
                tag=st.integers(1, 40).map(lambda f: f << 3),  # field number; bit: wire type
                other=st.integers(0, 15),
            )
        )

        @st.composite
        def build(draw) -> tuple[str, bytes, bytes]:
            """(address, bytes, the same edits made to the seed's canonical bytes)."""
            seeds = self.seeds(service, method)
            pick = draw(st.integers(0, 15)) % len(seeds)
            edits = draw(st.lists(edit, min_size=1, max_size=4))
            address = seeds[pick][0]
            sent, canonical = (
                mutate([raw for _, raw in versions], pick, edits)
                for versions in (seeds, [(a, self.alias(raw)) for a, raw in seeds])
            )
            return address, sent, canonical

        return build()

    def alias(self, raw: bytes) -> bytes:
        """`raw` with each session id the orchestrator made replaced by its alias: the bytes
        every run with the seed sends (an alias has its id's length, so edits match)."""
        text = raw.decode("latin-1")
        return SERVER_SESSION.sub(lambda m: self.aliases.get(m[0], m[0]), text).encode("latin-1")

    def canonical(self, msg) -> bytes:
        """A request as every run with the seed sends it: the stages' and the orchestrator's
        addresses (their ports differ) and the server-made session ids replaced by names."""
        names = {a: f"stage{i}" for i, a in enumerate(self.stages)}
        names[self.orchestrator] = "orchestrator"
        pattern = "|".join(re.escape(a) for a in sorted(names, key=len, reverse=True))
        copy = type(msg).FromString(msg.SerializeToString())
        if isinstance(copy, pb.PlanRequest):
            copy.stages[:] = [re.sub(pattern, lambda m: names[m[0]], g) for g in copy.stages]
        for step in copy.steps if isinstance(copy, pb.StepBatch) else [copy]:
            if "session_id" in step.DESCRIPTOR.fields_by_name:
                step.session_id = self.alias(step.session_id.encode()).decode()
        return copy.SerializeToString()

    # ---- judging

    def wedges(self, address: str, raw: bytes) -> bool:
        """Whether a LoadLayers would be carried out under an epoch that leaves no room for the
        plans after it (see WEDGING_EPOCH)."""
        try:
            msg = pb.LoadLayersRequest.FromString(raw)
        except (DecodeError, RuntimeError, ValueError):
            return False
        carried_out = (
            (msg.layer_start, msg.layer_end) == (0, 0)
            if msg.hold_nothing
            else 0 <= msg.layer_start < msg.layer_end <= LAYERS
        )
        newer = msg.plan_epoch > self.epoch(address)
        return carried_out and newer and msg.plan_epoch >= WEDGING_EPOCH

    def unreachable_reason(self, rpc: str, raw: bytes, detail: str) -> str:
        """Why an UNAVAILABLE answer is what the fuzz itself caused, or "" when it is not: a
        Generate while the plan's stages do not hold its layers (the detail names a stage), or a
        plan request naming an address that is no stage (the detail names it)."""
        if rpc in ("Orchestrator.Generate", "Orchestrator.GenerateStream"):
            if self.layout_broken and "stage" in detail:
                return "Generate on a broken layout"
            return ""
        if rpc in ("Orchestrator.PreviewPlan", "Orchestrator.ReloadPlan") and parses(
            pb.PlanRequest, raw
        ):
            named = [
                a.strip()
                for group in pb.PlanRequest.FromString(raw).stages
                for a in group.split("+")
                if a.strip()
            ]
            junk = [a for a in named if a not in self.stages]
            if any(a in detail for a in junk):
                return "a plan naming an address that is no stage"
        return ""

    def judge(self, rpc: str, address: str, raw: bytes, code: str, detail: str) -> None:
        if not parses(REQUEST_TYPES[rpc], raw):
            self.invalid_bytes[rpc] += 1
            if code != "INVALID_ARGUMENT" or "not a valid llamadist." not in detail:
                self.fail(rpc, address, raw, code, f"{detail} (bytes that are not a valid message)")
            return
        if code == "UNAVAILABLE":
            reason = self.unreachable_reason(rpc, raw, detail)
            if reason:
                self.unavailable[reason] += 1
                return
            detail = f"{detail} (no stage was made unreachable: layout {self.layout_broken!r})"
        elif code == "DEADLINE_EXCEEDED":
            detail = f"{detail} (no answer within the deadline: a hang)"
        elif code in ACCEPTED:
            return
        self.fail(rpc, address, raw, code, detail)

    def fail(self, rpc: str, address: str, raw: bytes, code: str, detail: str) -> None:
        self.failures.append(
            f"{rpc} to {address} -> {code}: {detail}\n  request {raw.hex()}\n  {self.replay}"
        )

    # ---- calls

    def call(
        self, service: str, method: str, reply_type, address: str, raw: bytes, canonical: bytes
    ) -> None:
        """Sends `raw` and judges the answer; `canonical` is the request as every run with the
        seed sends it (see `canonical`), for the digest."""
        rpc = f"{service}.{method}"
        if method == "LoadLayers" and self.wedges(address, raw):
            self.skipped["LoadLayers under an epoch near 2**64"] += 1
            return
        self.digest.update(f"{rpc} {self.where(address)} {len(canonical)} ".encode() + canonical)
        path = f"/llamadist.{service}/{method}"
        timeout_s = PLAN_DEADLINE_S if method in ("PreviewPlan", "ReloadPlan") else DEADLINE_S
        detail = ""
        t0 = time.monotonic()
        try:
            if method == "GenerateStream":
                replies = list(self.channel(address).unary_stream(path)(raw, timeout=timeout_s))
            elif method == "ForwardStream":
                call = self.channel(address).stream_stream(path)
                replies = list(call(iter([raw]), timeout=timeout_s))
            else:
                replies = [self.channel(address).unary_unary(path)(raw, timeout=timeout_s)]
            code = "OK"
            self.answered(rpc, address, raw, reply_type, replies)
        except grpc.RpcError as err:
            code, detail = err.code().name, err.details() or ""
        self.calls += 1
        self.seconds[rpc] += time.monotonic() - t0
        self.broken_calls += bool(self.layout_broken)
        self.counts.setdefault(rpc, Counter())[code] += 1
        if method in ("Generate", "GenerateStream"):
            self.generate_kinds.setdefault(generate_kind(raw), Counter())[code] += 1
        self.judge(rpc, address, raw, code, detail)
        dead = [p for p in self.processes if p.proc.poll() is not None]
        assert not dead, (
            f"{dead[0].name} died after {rpc} to {address} ({code}: {detail}), "
            f"request {raw.hex()}; {self.replay}\n{dead[0].tail(40)}"
        )
        if method in ("LoadLayers", "ReloadPlan"):
            self.check_layout()

    def where(self, address: str) -> str:
        if address == self.orchestrator:
            return "orchestrator"
        return f"stage{self.stages.index(address)}"

    def answered(self, rpc: str, address: str, raw: bytes, reply_type, replies: list) -> None:
        """Checks the replies of an OK call: valid messages, and each streamed step's status."""
        try:
            parsed = [reply_type.FromString(r) for r in replies]
        except DecodeError as err:
            self.fail(rpc, address, raw, "OK", f"a reply is not a valid message: {err}")
            return
        if rpc == "Stage.Forward":  # a session the stage now caches: for EndSession
            self.cached(address).append(pb.StepRequest.FromString(raw).session_id)
        if rpc == "Stage.EndSession":
            ended = pb.EndSessionRequest.FromString(raw).session_id
            self.stage_sessions[address] = collections.deque(
                (s for s in self.cached(address) if s != ended), maxlen=16
            )
        if rpc == "Stage.ForwardStream":
            steps = self.counts.setdefault("Stage.ForwardStream steps", Counter())
            requests = pb.StepBatch.FromString(raw).steps
            replies = [s for r in parsed for s in r.replies]
            if any(r.route for r in requests):
                # forwarded steps are answered elsewhere (their origin's outlet, which the
                # fuzz does not hold), so only a count and each answer's code can be checked
                here = sum(not r.route for r in requests)
                if not here <= len(replies) <= len(requests):
                    detail = f"{len(requests)} steps ({here} unrouted), {len(replies)} replies"
                    self.fail(rpc, address, raw, "OK", detail)
                for step in replies:
                    code = STATUS_NAMES.get(step.error_code, f"code {step.error_code}")
                    steps[code] += 1
                    # a successor that is no stage: UNAVAILABLE naming the hop after this one
                    if code not in ACCEPTED and not (code == "UNAVAILABLE" and step.failed_hop):
                        self.fail(rpc, address, raw, f"a step {code}", step.error_message)
                return
            if len(replies) != len(requests):
                detail = f"{len(requests)} steps, {len(replies)} replies"
                self.fail(rpc, address, raw, "OK", detail)
                return
            for request, step in zip(requests, replies, strict=True):
                code = STATUS_NAMES.get(step.error_code, f"code {step.error_code}")
                steps[code] += 1
                if code == "OK":
                    self.cached(address).append(request.session_id)
                elif code not in ACCEPTED:  # a stage step is never UNAVAILABLE: it is alive
                    self.fail(rpc, address, raw, f"a step {code}", step.error_message)
        if rpc.startswith("Orchestrator.Generate") and parsed:
            session = parsed[-1].session_id
            self.sessions.append(session)
            if SERVER_SESSION.fullmatch(session):  # its alias has its length (see `mutated`)
                self.aliases.setdefault(session, f"session{len(self.aliases):025d}")
            self.finish_reasons[pb.FinishReason.Name(parsed[-1].finish_reason)] += 1

    def summary(self) -> str:
        tables = {**self.counts, **{f"Generate: {k}": c for k, c in self.generate_kinds.items()}}
        codes = sorted({c for counter in tables.values() for c in counter})
        width = max(len(r) for r in tables) + 2
        head = "".join(f"{c[:12]:>13}" for c in codes)
        lines = [f"{'rpc':<{width}}{head}{'total':>8}{'seconds':>9}"]
        for rpc, counter in sorted(tables.items()):
            cells = "".join(f"{counter.get(c, 0):>13}" for c in codes)
            seconds = f"{self.seconds[rpc]:>9.1f}" if rpc in self.seconds else ""
            lines.append(f"{rpc:<{width}}{cells}{sum(counter.values()):>8}{seconds}")
        lines += [
            f"bytes that are not a valid message: {dict(self.invalid_bytes)}",
            f"UNAVAILABLE accepted: {dict(self.unavailable)}; calls on a broken layout: "
            f"{self.broken_calls}; skipped: {dict(self.skipped)}",
            f"generations finished by: {dict(self.finish_reasons)}",
            f"request sequence sha256 {self.digest.hexdigest()[:16]} (seed {self.seed})",
        ]
        return "\n".join(lines)


def mutate(seeds: list[bytes], pick: int, edits: list[dict]) -> bytes:
    """seeds[pick] with the edits made in order."""
    data = bytearray(seeds[pick])
    for e in edits:
        at = e["at"] % (len(data) + 1)
        inside = min(at, len(data) - 1)
        if e["op"] == "flip" and data:
            data[inside] ^= 1 << e["bit"]
        elif e["op"] == "truncate":
            del data[at:]
        elif e["op"] == "insert":
            data[at:at] = e["blob"]
        elif e["op"] == "delete":
            del data[at : at + e["n"]]
        elif e["op"] == "set" and data:
            data[inside] = e["byte"]
        elif e["op"] == "field":  # a stray field: any number, any wire type, any payload
            data += varint(e["tag"] | e["bit"]) + e["blob"]
        elif e["op"] == "concat":  # two messages back to back: protobuf merges them
            data += seeds[e["other"] % len(seeds)]
    return bytes(data)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model):
    model = make_tokenizer_model(tmp_path_factory.mktemp("fuzz") / "tokenizer", default_model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    assert vocab == VOCAB, f"the default model's vocabulary is {vocab}, the fuzz expects {VOCAB}"
    return model


@pytest.fixture(scope="module")
def mesh(model_dir, tmp_path_factory):
    with LocalMesh(str(model_dir), 2, log_dir=tmp_path_factory.mktemp("fuzz-logs")) as m:
        yield m


def test_fuzz_every_rpc_of_both_services(mesh, model_dir):
    seed = fuzz_seed()
    stage_addresses = [p.address for p in mesh.processes if p.name.startswith("stage")]
    fz = Fuzzer(
        mesh.address,
        stage_addresses,
        seed,
        processes=list(mesh.processes),
        stage_key=load_stage_key(mesh.stage_key_file),
    )
    print(f"\nfuzz seed {seed} ({fz.replay})")
    fz.check_layout()
    assert not fz.layout_broken, fz.layout_broken
    rng = random.Random(seed)
    t0 = time.monotonic()

    def fuzz(service: str, method: str, reply_type, examples: int, block_seed: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],  # statuses are recorded, not raised: nothing to shrink
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.seed(block_seed)
        @given(st.data())
        def one_request(data):
            if data.draw(st.integers(0, 2)):
                address, msg = data.draw(fz.well_formed(method, service))
                raw, canonical = msg.SerializeToString(), fz.canonical(msg)
            else:
                address, raw, canonical = data.draw(fz.mutated(service, method))
            fz.call(service, method, reply_type, address, raw, canonical)

        try:
            one_request()
        except Exception as err:
            raise AssertionError(f"{service}.{method}: {err!r}; {fz.replay}") from err

    # Rounds of every RPC in a shuffled order, so that layout changes (LoadLayers, ReloadPlan)
    # come between the others; each RPC gets its share of TOTAL_REQUESTS by weight. After most
    # LoadLayers / ReloadPlan blocks the layout is restored; after the others the next blocks
    # run on whatever the fuzz left (Generate may then be UNAVAILABLE, see unreachable_reason).
    weights = sum(w for *_, w in RPCS)
    for _ in range(ROUNDS):
        for service, method, _, reply_type, weight in rng.sample(RPCS, len(RPCS)):
            examples = -(-TOTAL_REQUESTS * weight // (weights * ROUNDS))
            if (service, method) == ("Stage", "EndSession"):
                fz.open_sessions()
            fuzz(service, method, reply_type, examples, rng.getrandbits(64))
            if method in ("LoadLayers", "ReloadPlan") and rng.random() < RESTORE_P:
                fz.restore()
    elapsed = time.monotonic() - t0
    print(f"\n{fz.calls} fuzzed requests in {elapsed:.0f} s\n{fz.summary()}")

    replay = fz.replay
    if fz.failures:
        failures = "\n".join(fz.failures[:20])
        pytest.fail(f"{len(fz.failures)} failing statuses ({replay}):\n{failures}", False)
    assert fz.calls >= MIN_TOTAL, f"{fz.calls} requests; {replay}"
    for service, method, *_ in RPCS:
        rpc = f"{service}.{method}"
        counter = fz.counts.get(rpc, Counter())
        assert sum(counter.values()) >= MIN_PER_RPC, f"{rpc}: {dict(counter)}; {replay}"
        served = SERVED_CODE.get(rpc, "OK")
        assert counter[served] >= MIN_SERVED_PER_RPC, f"{rpc}: {dict(counter)}; {replay}"
        invalid = fz.invalid_bytes[rpc]
        assert invalid >= MIN_INVALID_BYTES_PER_RPC, f"{rpc}: {invalid} invalid; {replay}"
    ok = {kind: counter["OK"] for kind, counter in fz.generate_kinds.items()}
    for what, total in {
        "a prompt": ok.get("prompt", 0) + ok.get("prompt + stop", 0),
        "a chat": ok.get("chat", 0) + ok.get("chat + stop", 0),
        "stop strings": sum(n for kind, n in ok.items() if kind.endswith("+ stop")),
    }.items():
        assert total >= MIN_TOKENIZER_OK, f"{total} Generate OK with {what}; {replay}"
    assert fz.finish_reasons["STOP"] >= MIN_STOPPED, f"{dict(fz.finish_reasons)}; {replay}"
    assert all(p.proc.poll() is None for p in mesh.processes), replay

    # A valid request is served correctly afterwards, on a restored layout.
    with Client(mesh.address, timeout_s=60) as client:
        plan = client.reload_plan(strategy="uniform", stages=stage_addresses)
        ranges = [(s["layer_start"], s["layer_end"]) for s in plan["stages"]]
        assert ranges == [(0, 2), (2, 4)], f"{ranges}; {replay}"
        expected = reference_greedy(model_dir, PROMPT, 24)
        reply = client.generate(token_ids=PROMPT, max_new_tokens=24, ignore_eos=True)
        assert reply.token_ids == expected, replay
        streamed = list(client.stream(token_ids=PROMPT, max_new_tokens=24, ignore_eos=True))
        assert [t for piece in streamed for t in piece.token_ids] == expected, replay
        # and through the tokenizer: a prompt and a chat, tokenized as transformers does
        hf = AutoTokenizer.from_pretrained(str(model_dir))
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        for text, ids in (
            ("Once upon a time", hf("Once upon a time")["input_ids"]),
            (None, hf.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]),
        ):
            kwargs = {"messages": chat} if text is None else {}
            reply = client.generate(text, max_new_tokens=8, ignore_eos=True, **kwargs)
            assert reply.prompt_tokens == len(ids), (text, reply.prompt_tokens, replay)
            assert reply.token_ids == reference_greedy(model_dir, ids, 8), (text, replay)
            assert reply.text == hf.decode(reply.token_ids, skip_special_tokens=True), replay
        assert client.health() == (True, ""), replay
    for address in stage_addresses:
        with grpc.insecure_channel(address) as channel:
            reply = channel.unary_unary(
                "/llamadist.Stage/Health", response_deserializer=pb.HealthReply.FromString
            )(b"", timeout=DEADLINE_S)
            assert reply.status == pb.HealthReply.SERVING, (address, reply.detail, replay)
    assert all(p.proc.poll() is None for p in mesh.processes), replay
