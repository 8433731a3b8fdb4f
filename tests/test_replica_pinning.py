"""Who serves a session, over real gRPC (in-process): with replicas of a position (`A+B,C`) each
session is pinned to the least loaded live replica for its whole generation; the per-client cap
counts API keys, each key on its own; a session whose stage died resumes by its id once the plan
is reloaded around the dead stage, with the tokens of an uninterrupted run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from client.client import Client, ClientError, Completion
from orchestrator.config import OrchestratorConfig
from orchestrator.orchestrator import Orchestrator
from orchestrator.server import build_server as build_orchestrator
from protos import llamadist_pb2_grpc as pb_grpc
from protos.shared.serving import GRPC_OPTIONS
from stage_service.config import StageConfig
from stage_service.server import build_server as build_stage
from stage_service.stage import Stage
from tests.conftest import (
    in_process_mesh,
    make_tiny_model,
    orchestrator_stage_key,
    reference_greedy,
    reference_model,
    stage_key,
)
from tests.test_admission import slow_down

PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("pinning"), "untied_mha")  # 6 layers


@dataclass
class ReplicaMesh:
    stages: dict[str, Stage]  # by name: "a", "b" (replicas of position 0), "c" (position 1)
    addresses: dict[str, str]  # by name
    orchestrator: Orchestrator
    client: Client


@contextmanager
def replica_mesh(model_dir: Path, groups: str = "a+b,c") -> Iterator[ReplicaMesh]:
    """Stages named by the letters of `groups`, the orchestrator planned over `groups` (with the
    letters replaced by the stages' addresses); as conftest's in_process_mesh, by hand."""
    servers: list[grpc.Server] = []
    stages, addresses = {}, {}
    for name in sorted(set(groups) - set("+,")):
        server, port, stage = build_stage(
            StageConfig(model=str(model_dir), kv_cache_mb=64, **stage_key())
        )
        server.start()
        servers.append(server)
        stages[name], addresses[name] = stage, f"127.0.0.1:{port}"
    plan = tuple("+".join(addresses[n] for n in g.split("+")) for g in groups.split(","))
    config = OrchestratorConfig(
        model=str(model_dir), port=0, stages=plan, stage_wait_s=10, **orchestrator_stage_key()
    )
    server, port, orchestrator = build_orchestrator(config)
    server.start()
    orchestrator.start()
    client = Client(f"127.0.0.1:{port}", timeout_s=60)
    try:
        yield ReplicaMesh(stages, addresses, orchestrator, client)
    finally:
        client.close()
        server.stop(0)
        orchestrator.close()
        for s in servers:
            s.stop(0)


def record_sessions(stage: Stage) -> set[str]:
    """The ids of every session `stage` computes a step for from now on."""
    seen: set[str] = set()
    run = stage.batcher.run_batch

    def recording(jobs):
        seen.update(j.step.session_id for j in jobs)
        run(jobs)

    stage.batcher.run_batch = recording
    return seen


def slow_decode(stage: Stage, seconds: float) -> threading.Event:
    """Until the returned event is set, each batch of decode steps on `stage` takes `seconds`
    longer (prefills do not), so that sessions stay running while others start."""
    release = threading.Event()
    run = stage.batcher.run_batch

    def slow(jobs):
        if all(len(j.step.token_ids) == 1 for j in jobs):
            release.wait(seconds)
        run(jobs)

    stage.batcher.run_batch = slow
    return release


def greedy_references(model_dir: Path, prompts: dict[str, list[int]], new_tokens: int) -> dict:
    """transformers' greedy tokens for each prompt, the model loaded once."""
    model = reference_model(model_dir)
    config = model.generation_config
    config.eos_token_id, config.pad_token_id = None, 0
    config.max_new_tokens, config.do_sample = new_tokens, False
    with torch.inference_mode():
        return {
            key: model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist()
            for key, p in prompts.items()
        }


def holder(mesh: ReplicaMesh, session_id: str) -> str:
    """Which replica of position 0 caches the session ("a", "b", or "" for neither)."""
    held = [n for n in "ab" if session_id in mesh.stages[n].loaded.cache]
    assert len(held) <= 1, f"{session_id} is cached on both replicas"
    return held[0] if held else ""


def test_sessions_go_to_the_least_loaded_replica_and_stay_there(model_dir):
    prompts = {f"s{i}": PROMPT[i:] + PROMPT[:i] for i in range(1, 6)}
    expected = greedy_references(model_dir, prompts, 48)
    with replica_mesh(model_dir) as mesh:
        served = {n: record_sessions(mesh.stages[n]) for n in "ab"}
        release = slow_decode(mesh.stages["c"], 0.05)  # 48 tokens: 2.4 s at least, until released
        generator = mesh.orchestrator.generator

        def start(sid: str) -> tuple[Iterator, list[int]]:
            stream = mesh.client.stream(token_ids=prompts[sid], max_new_tokens=48, session_id=sid)
            first = next(stream)  # prefilled: pinned and cached
            return stream, first.token_ids

        streams = {sid: start(sid) for sid in ("s1", "s2", "s3", "s4")}
        placed = {sid: holder(mesh, sid) for sid in streams}
        # each new session went to the replica with fewer sessions: they alternate
        assert [placed[s] for s in ("s1", "s2", "s3", "s4")] in (list("abab"), list("baba"))
        listed = {s["address"]: s["info"]["active_sessions"] for s in mesh.client.stages()}
        assert [listed[mesh.addresses[n]] for n in "abc"] == [2, 2, 4]  # ListStages agrees

        # the second replica's two sessions end: the next session goes there, not to the first
        second = placed["s2"]
        for sid in ("s2", "s4"):
            mesh.client.end_session(sid)
        assert {"s1", "s3"} <= set(generator._active), "the sessions ended too soon to check"
        streams["s5"] = start("s5")
        assert holder(mesh, "s5") == second
        release.set()

        tokens = {}
        for sid in ("s1", "s3", "s5"):
            stream, first = streams[sid]
            tokens[sid] = first + [t for piece in stream for t in piece.token_ids]
        for stream, _ in (streams["s2"], streams["s4"]):
            with pytest.raises(ClientError) as err:
                list(stream)
            assert err.value.code == "CANCELLED"
    assert tokens == {sid: expected[sid] for sid in ("s1", "s3", "s5")}
    # pinned for the whole generation: no step of a session ever ran on the other replica
    assert served["a"].isdisjoint(served["b"]), (served["a"], served["b"])
    assert {sid for sid in prompts if sid in served[second]} == {"s2", "s4", "s5"}


def on_its_own_connection(address: str, api_key: str) -> Client:
    """A Client with a connection of its own (in one process gRPC shares a connection between
    channels to the same address with the same options)."""
    client = Client(address, timeout_s=60, api_key=api_key)
    client.channel.close()
    options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    client.channel = grpc.insecure_channel(address, options=options)
    client.stub = pb_grpc.OrchestratorStub(client.channel)
    return client


def test_with_api_keys_each_key_has_its_own_session_cap(model_dir, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("key-a client\nkey-b client\n")
    with in_process_mesh(model_dir, 1, max_sessions_per_client=2, api_keys_file=str(keys)) as mesh:
        slow_down(mesh.stages[0], 0.02)
        a, b = (Client(mesh.address, timeout_s=60, api_key=k) for k in ("key-a", "key-b"))
        a_again = on_its_own_connection(mesh.address, "key-a")
        streams = [a.stream(token_ids=PROMPT, max_new_tokens=200) for _ in range(2)]
        for s in streams:
            next(s)  # key-a is at its cap
        for over in (a, a_again):  # the same key over another connection too
            with pytest.raises(ClientError) as err:
                over.generate(token_ids=PROMPT, max_new_tokens=2)
            assert (
                err.value.code == "RESOURCE_EXHAUSTED" and "limit per client" in err.value.message
            )
        # key-b, from the same host, runs its own two meanwhile
        b_streams = [b.stream(token_ids=PROMPT, max_new_tokens=200) for _ in range(2)]
        assert all(next(s).token_ids for s in b_streams)
        with pytest.raises(ClientError) as err:
            b.generate(token_ids=PROMPT, max_new_tokens=2)
        assert err.value.code == "RESOURCE_EXHAUSTED"
        assert all(next(s).token_ids for s in streams)  # key-a's still run
        for s in streams + b_streams:
            s.close()  # cancels the call: its session and its place under the cap are freed
        generator = mesh.orchestrator.generator
        deadline = time.monotonic() + 5
        while generator._active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert a.generate(token_ids=PROMPT, max_new_tokens=2).token_ids
        for c in (a, a_again, b):
            c.close()


@dataclass
class Resumed:
    before: list[int]  # streamed before the stage died
    failure: ClientError  # what the stream ended with
    failed_after_s: float  # from the stage's death
    addresses: list[str]
    plan: dict  # the reloaded plan
    reply: Completion  # the Generate that resumed the session


@pytest.fixture(scope="module")
def resumed(model_dir) -> Resumed:
    """3 stages, the plan on the first 2; stage 1 dies mid-stream, the plan is reloaded onto
    stages 0 and 2, and a Generate naming the session resumes it."""
    with in_process_mesh(model_dir, 3, plan_stages=2) as mesh:
        stream = mesh.client.stream(token_ids=PROMPT, max_new_tokens=40, session_id="resume-me")
        before = [t for _, piece in zip(range(5), stream, strict=False) for t in piece.token_ids]
        mesh.stage_servers[1].stop(0)  # no replica
        t0 = time.monotonic()
        with pytest.raises(ClientError) as err:
            list(stream)
        failed_after_s = time.monotonic() - t0
        live = [mesh.addresses[0], mesh.addresses[2]]
        plan = mesh.client.reload_plan(strategy="uniform", stages=live)
        # the input is ignored for a suspended session: it resumes
        reply = mesh.client.generate(token_ids=[1], max_new_tokens=40, session_id="resume-me")
        return Resumed(before, err.value, failed_after_s, mesh.addresses, plan, reply)


def test_a_session_resumes_after_the_plan_is_reloaded_around_its_dead_stage(model_dir, resumed):
    expected = reference_greedy(model_dir, PROMPT, 40)
    failure, addresses = resumed.failure, resumed.addresses
    assert failure.code == "UNAVAILABLE" and resumed.failed_after_s < 5
    assert "resume-me" in failure.message and f"stage 1 ({addresses[1]})" in failure.message
    assert [s["address"] for s in resumed.plan["stages"]] == [addresses[0], addresses[2]]
    assert len(resumed.before) == 5 and resumed.before == expected[:5]
    # the reply holds the whole generation, as an uninterrupted run's
    assert resumed.reply.token_ids == expected and resumed.reply.finish_reason == "length"
    assert resumed.reply.session_id == "resume-me"


def test_a_resumed_reply_counts_the_prompt_of_its_session(resumed):
    assert resumed.reply.prompt_tokens == len(PROMPT)
