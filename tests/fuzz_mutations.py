"""Mutated requests for the fuzz test (tests/test_fuzz.py): valid serialized requests per RPC
(`seeds`, drawn from what `Requests` knows of the mesh), edited 1-4 times byte by byte
(`mutated`), with the same edits made to their canonical bytes for the replay digest."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from protos import llamadist_pb2 as pb
from tests.fuzz_requests import Requests
from tests.fuzz_values import HIDDEN, PROMPT, mutate


def seeds(requests: Requests, service: str, method: str) -> list[tuple[str, bytes]]:
    """Valid serialized requests to mutate, with their addresses."""
    s0, s1 = requests.stages
    if service == "Stage" and method == "Forward":
        hidden = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
        first = pb.StepRequest(
            session_id="seed-0", plan_epoch=requests.epoch(s0), token_ids=[1, 2, 3]
        )
        second = pb.StepRequest(
            session_id="seed-0",
            plan_epoch=requests.epoch(s1),
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
            for address, raw in seeds(requests, "Stage", "Forward")
            for n in (1, 3)
        ]
    if method == "EndSession":
        return [
            (a, pb.EndSessionRequest(session_id=requests.known(stage)[-1]).SerializeToString())
            for a, stage in (
                [(s0, s0), (s1, s1)] if service == "Stage" else [(requests.orchestrator, "")]
            )
        ]
    if method == "LoadLayers":  # a retry of what the stage holds, a newer range, a drop
        msgs = [
            (s0, pb.LoadLayersRequest(layer_start=0, layer_end=2, plan_epoch=requests.epoch(s0))),
            (s1, pb.LoadLayersRequest(layer_start=2, layer_end=4, plan_epoch=requests.epoch(s1))),
            (s1, pb.LoadLayersRequest(layer_start=1, layer_end=4, plan_epoch=requests.epoch(s1))),
            (s0, pb.LoadLayersRequest(hold_nothing=True, plan_epoch=requests.epoch(s0) + 1)),
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
        return [(requests.orchestrator, m.SerializeToString()) for m in msgs]
    if method in ("PreviewPlan", "ReloadPlan"):
        msgs = [
            pb.PlanRequest(strategy="uniform"),
            pb.PlanRequest(strategy="custom", boundaries="0-0,1-3"),
            pb.PlanRequest(strategy="memory", max_memory="4GB", num_partitions=2),
        ]
        return [(requests.orchestrator, m.SerializeToString()) for m in msgs]
    address = requests.orchestrator if service == "Orchestrator" else s0
    return [(address, b""), (s1 if service == "Stage" else address, b"")]


def mutated(requests: Requests, service: str, method: str) -> st.SearchStrategy:
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
        valid = seeds(requests, service, method)
        pick = draw(st.integers(0, 15)) % len(valid)
        edits = draw(st.lists(edit, min_size=1, max_size=4))
        address = valid[pick][0]
        sent, canonical = (
            mutate([raw for _, raw in versions], pick, edits)
            for versions in (valid, [(a, requests.alias(raw)) for a, raw in valid])
        )
        return address, sent, canonical

    return build()
