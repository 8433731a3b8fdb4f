"""Fuzz every RPC of both services (issue 5) against real processes: a 2-stage LocalMesh on a tiny
random model. Hypothesis sends random well-formed messages (random strings, huge and negative
numbers, NaN floats, random token ids, tensors of random shape, dtype and data, a random oneof
choice) and mutated bytes of valid requests (bit flips, truncation, insertion, deletion, stray
fields), at the raw gRPC level, to the orchestrator and to each stage directly.

ForwardStream gets random and mutated StepBatch messages of up to 5 steps; each step's own status
(in its reply) counts too ("Stage.ForwardStream steps" in the summary).

Passes when no process died, no call was answered INTERNAL or UNKNOWN (or UNIMPLEMENTED), and a
valid request is served correctly afterwards: the layout restored by a ReloadPlan, a greedy
Generate equals transformers' own. A summary of the statuses per RPC is printed (`-s`).
"""

from __future__ import annotations

import collections
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from client.client import Client
from client.launcher import LocalMesh
from protos import llamadist_pb2 as pb
from protos.serving import GRPC_OPTIONS
from tests.conftest import make_tiny_model, reference_greedy

pytestmark = pytest.mark.slow

MODEL = "gqa"  # 4 layers, vocabulary 101, hidden size 64, context 256
VOCAB, HIDDEN, LAYERS, CONTEXT = 101, 64, 4, 256
DEADLINE_S = 5.0  # every fuzzed call; DEADLINE_EXCEEDED is acceptable, nothing runs longer
TOTAL_REQUESTS = 4000
MIN_PER_RPC = 50
ROUNDS = 5
FAILING = {"INTERNAL", "UNKNOWN", "UNIMPLEMENTED", "DATA_LOSS"}
PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

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
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "a" * 129, "é", "\U0001d11e", "../../etc", "%s%n{}"]),
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


# ---------------------------------------------------------------------- the fuzzer


@dataclass
class Fuzzer:
    orchestrator: str
    stages: list[str]
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    epochs: dict[str, int] = field(default_factory=dict)
    sessions: collections.deque = field(default_factory=lambda: collections.deque(maxlen=16))
    counts: dict[str, collections.Counter] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    processes: list = field(default_factory=list)
    calls: int = 0

    def channel(self, address: str) -> grpc.Channel:
        if address not in self.channels:
            self.channels[address] = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        return self.channels[address]

    def refresh_epochs(self) -> None:
        for address in self.stages:
            try:
                info = self.channel(address).unary_unary(
                    "/llamadist.Stage/Info", response_deserializer=pb.StageInfo.FromString
                )(b"", timeout=DEADLINE_S)
                self.epochs[address] = info.plan_epoch
            except grpc.RpcError:
                pass

    def epoch(self, address: str) -> int:
        return self.epochs.get(address, 1)

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
                return st.tuples(stage, self.end_session_requests())
            if method == "LoadLayers":
                return stage.flatmap(
                    lambda a: st.builds(
                        pb.LoadLayersRequest,
                        layer_start=weighted((4, st.integers(-1, LAYERS + 1)), (1, I32)),
                        layer_end=weighted((4, st.integers(-1, LAYERS + 1)), (1, I32)),
                        plan_epoch=self.epochs_near(a),
                    ).map(lambda m: (a, m))
                )
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
            return msg

        return build()

    def known(self) -> list[str]:
        return list(self.sessions) or ["seed-0"]

    def known_session(self) -> st.SearchStrategy:
        """A session id seen in a reply (the same draws whatever the state, as hypothesis
        wants)."""
        return st.integers(0, 15).map(lambda i: self.known()[i % len(self.known())])

    def end_session_requests(self) -> st.SearchStrategy:
        return st.builds(
            pb.EndSessionRequest,
            session_id=st.one_of(SESSION, self.known_session()),
        )

    def generate_requests(self) -> st.SearchStrategy:
        chat = st.lists(
            st.builds(
                pb.ChatMessage,
                role=st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), TEXT),
                content=TEXT,
            ),
            max_size=3,
        )

        @st.composite
        def build(draw) -> pb.GenerateRequest:
            msg = pb.GenerateRequest(
                max_new_tokens=draw(MAX_NEW_TOKENS),
                stop=draw(weighted((4, st.just([])), (1, st.lists(TEXT, max_size=3)))),
                ignore_eos=draw(st.booleans()),
            )
            kind = draw(
                weighted(
                    (6, st.just("token_ids")),
                    (1, st.just("prompt")),
                    (1, st.just("chat")),
                    (1, st.just("")),
                )
            )
            if kind == "token_ids":
                msg.token_ids.ids.extend(draw(TOKENS))
            elif kind == "prompt":
                msg.prompt = draw(TEXT)
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
            hidden = torch.randn(3, HIDDEN).view(torch.uint8).numpy().tobytes()
            first = pb.StepRequest(
                session_id="seed-0", plan_epoch=self.epoch(s0), token_ids=[1, 2, 3]
            )
            second = pb.StepRequest(
                session_id="seed-0",
                plan_epoch=self.epoch(s1),
                token_ids=[1, 2, 3],
                hidden=pb.Tensor(data=hidden, shape=[3, HIDDEN], dtype=pb.FLOAT32),
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
            msg = pb.EndSessionRequest(session_id=self.known()[-1]).SerializeToString()
            return [(a, msg) for a in ([s0, s1] if service == "Stage" else [self.orchestrator])]
        if method == "LoadLayers":
            return [
                (
                    a,
                    pb.LoadLayersRequest(
                        layer_start=start, layer_end=end, plan_epoch=e
                    ).SerializeToString(),
                )
                for a, start, end in ((s0, 0, 2), (s1, 2, 4))
                for e in (self.epoch(a),)
            ]
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
        def build(draw) -> tuple[str, bytes]:
            seeds = self.seeds(service, method)
            address, raw = seeds[draw(st.integers(0, 15)) % len(seeds)]
            data = bytearray(raw)
            for e in draw(st.lists(edit, min_size=1, max_size=4)):
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
                    data += seeds[e["other"] % len(seeds)][1]
            return address, bytes(data)

        return build()

    # ---- calls

    def call(self, service: str, method: str, reply_type, address: str, raw: bytes) -> str:
        path = f"/llamadist.{service}/{method}"
        detail = ""
        try:
            if method == "GenerateStream":
                replies = list(self.channel(address).unary_stream(path)(raw, timeout=DEADLINE_S))
            elif method == "ForwardStream":
                call = self.channel(address).stream_stream(path)
                replies = list(call(iter([raw]), timeout=DEADLINE_S))
                for reply in replies:  # each step's own status, carried in the reply
                    for step in reply_type.FromString(reply).replies:
                        step_code = STATUS_NAMES.get(step.error_code, f"code {step.error_code}")
                        steps = self.counts.setdefault("Stage.ForwardStream steps", Counter())
                        steps[step_code] += 1
                        if step_code in FAILING or step_code.startswith("code"):
                            detail = f"a step answered {step_code}: {step.error_message}"
                            self.failures.append(f"{service}.{method} to {address}: {detail}")
            else:
                replies = [self.channel(address).unary_unary(path)(raw, timeout=DEADLINE_S)]
            for reply in replies:
                reply_type.FromString(reply)  # a reply is always a valid message
            code = "OK"
            if method in ("Generate", "GenerateStream") and replies:
                self.sessions.append(reply_type.FromString(replies[-1]).session_id)
        except grpc.RpcError as err:
            code, detail = err.code().name, err.details() or ""
        self.calls += 1
        rpc = f"{service}.{method}"
        self.counts.setdefault(rpc, collections.Counter())[code] += 1
        if code in FAILING:
            self.failures.append(f"{rpc} to {address} -> {code}: {detail}\n  request {raw.hex()}")
        dead = [p for p in self.processes if p.proc.poll() is not None]
        assert not dead, (
            f"{dead[0].name} died after {rpc} to {address} ({code}: {detail}), "
            f"request {raw.hex()}\n{dead[0].tail(40)}"
        )
        if method in ("LoadLayers", "ReloadPlan"):
            self.refresh_epochs()
        return code

    def summary(self) -> str:
        codes = sorted({c for counter in self.counts.values() for c in counter})
        width = max(len(r) for r in self.counts) + 2
        lines = [f"{'rpc':<{width}}" + "".join(f"{c[:12]:>13}" for c in codes) + f"{'total':>8}"]
        for rpc, counter in sorted(self.counts.items()):
            cells = "".join(f"{counter.get(c, 0):>13}" for c in codes)
            lines.append(f"{rpc:<{width}}{cells}{sum(counter.values()):>8}")
        return "\n".join(lines)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("fuzz"), MODEL)


@pytest.fixture(scope="module")
def mesh(model_dir, tmp_path_factory):
    with LocalMesh(str(model_dir), 2, log_dir=tmp_path_factory.mktemp("fuzz-logs")) as m:
        yield m


def test_fuzz_every_rpc_of_both_services(mesh, model_dir):
    stage_addresses = [p.address for p in mesh.processes if p.name.startswith("stage")]
    fz = Fuzzer(mesh.address, stage_addresses, processes=list(mesh.processes))
    fz.refresh_epochs()
    t0 = time.monotonic()

    def fuzz(service: str, method: str, reply_type, examples: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],  # statuses are recorded, not raised: nothing to shrink
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def one_request(data):
            if data.draw(st.integers(0, 2)):
                address, msg = data.draw(fz.well_formed(method, service))
                raw = msg.SerializeToString()
            else:
                address, raw = data.draw(fz.mutated(service, method))
            fz.call(service, method, reply_type, address, raw)

        one_request()

    # Rounds of every RPC in a shuffled order, so that layout changes (LoadLayers, ReloadPlan)
    # come between the others; each RPC gets its share of TOTAL_REQUESTS by weight.
    weights = sum(w for *_, w in RPCS)
    for round_ in range(ROUNDS):
        for service, method, _, reply_type, weight in random.Random(round_).sample(RPCS, len(RPCS)):
            fuzz(service, method, reply_type, -(-TOTAL_REQUESTS * weight // (weights * ROUNDS)))
    elapsed = time.monotonic() - t0
    print(f"\n{fz.calls} fuzzed requests in {elapsed:.0f} s\n{fz.summary()}")
    for failure in fz.failures[:20]:
        print(failure)

    assert not fz.failures, f"{len(fz.failures)} failing statuses:\n" + "\n".join(fz.failures[:20])
    assert fz.calls >= 2000, fz.calls
    for service, method, *_ in RPCS:
        hits = sum(fz.counts.get(f"{service}.{method}", {}).values())
        assert hits >= MIN_PER_RPC, f"{service}.{method} got only {hits} requests"
    assert all(p.proc.poll() is None for p in mesh.processes)

    # A valid request is served correctly afterwards, on a restored layout.
    with Client(mesh.address, timeout_s=60) as client:
        plan = client.reload_plan(strategy="uniform", stages=stage_addresses)
        assert [(s["layer_start"], s["layer_end"]) for s in plan["stages"]] == [(0, 2), (2, 4)]
        expected = reference_greedy(model_dir, PROMPT, 24)
        reply = client.generate(token_ids=PROMPT, max_new_tokens=24, ignore_eos=True)
        assert reply.token_ids == expected
        streamed = list(client.stream(token_ids=PROMPT, max_new_tokens=24, ignore_eos=True))
        assert [t for piece in streamed for t in piece.token_ids] == expected
        assert client.health() == (True, "")
    for address in stage_addresses:
        with grpc.insecure_channel(address) as channel:
            reply = channel.unary_unary(
                "/llamadist.Stage/Health", response_deserializer=pb.HealthReply.FromString
            )(b"", timeout=DEADLINE_S)
            assert reply.status == pb.HealthReply.SERVING, (address, reply.detail)
    assert all(p.proc.poll() is None for p in mesh.processes)
