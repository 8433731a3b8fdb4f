"""Requests for the fuzz test (tests/test_fuzz.py): which RPCs it calls and how often, what it
knows of the mesh (the stages' epochs, the sessions the answers showed, aliases for server-made
session ids), and from that the hypothesis strategies of random well-formed requests per RPC
(tests/fuzz_mutations.py mutates valid ones byte by byte). `canonical` is each request as every
run with the seed sends it (ports and server-made ids replaced by names): what the replay digest
hashes."""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

from hypothesis import strategies as st

from protos import llamadist_pb2 as pb
from tests.fuzz_values import (
    I32,
    I64,
    LAYERS,
    MAX_NEW_TOKENS,
    PROMPT_TEXT,
    SESSION,
    STOP,
    TEXT,
    TOKENS,
    U64,
    sampling_params,
    tensors,
    weighted,
)

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


@dataclass
class Requests:
    """What the fuzz knows of the mesh, and the strategies of requests drawn from it."""

    orchestrator: str
    stages: list[str]
    epochs: dict[str, int] = field(default_factory=dict)  # by stage, as its Info last said
    sessions: collections.deque = field(default_factory=lambda: collections.deque(maxlen=16))
    stage_sessions: dict[str, collections.deque] = field(default_factory=dict)  # by stage
    aliases: dict[str, str] = field(default_factory=dict)  # server-made session id -> alias

    # ---- what the answers showed

    def epoch(self, address: str) -> int:
        return self.epochs.get(address, 1)

    def reassigned(self, address: str, epoch: int) -> None:
        """The stage's Info says `epoch`: a new assignment drops every session it cached."""
        if epoch != self.epochs.get(address):
            self.cached(address).clear()
        self.epochs[address] = epoch

    def stepped(self, address: str, session_id: str) -> None:
        """The stage at `address` took a step of `session_id` and now caches it."""
        self.cached(address).append(session_id)

    def ended(self, address: str, session_id: str) -> None:
        """The stage at `address` ended `session_id`."""
        self.stage_sessions[address] = collections.deque(
            (s for s in self.cached(address) if s != session_id), maxlen=16
        )

    def generated(self, session_id: str) -> None:
        """A Generate answered with `session_id`; one the orchestrator made gets an alias of its
        length (see `mutated`)."""
        self.sessions.append(session_id)
        if SERVER_SESSION.fullmatch(session_id):
            self.aliases.setdefault(session_id, f"session{len(self.aliases):025d}")

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
                return stage.flatmap(lambda a: st.tuples(st.just(a), self.step_batches(a)))
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

    def step_batches(self, address: str) -> st.SearchStrategy:
        """Steps as one message; sometimes with their rows packed in StepBatch.hidden (as a
        stage sends them on), often of the row count the steps need."""

        @st.composite
        def build(draw) -> pb.StepBatch:
            batch = pb.StepBatch(steps=draw(st.lists(self.step_requests(address), max_size=5)))
            if not draw(st.integers(0, 3)):
                rows = sum(len(step.token_ids) for step in batch.steps)
                batch.hidden.CopyFrom(draw(tensors(rows=rows)))
            return batch

        return build()

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
