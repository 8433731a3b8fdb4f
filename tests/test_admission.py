"""What the orchestrator admits and when it lets go, over real gRPC (in-process meshes):
a busy stage is waited for, not marked down; long prompts go in bounded chunks and a burst of
them waits its turn in the orchestrator; a call whose caller is gone stops and frees its
session; the per-client cap counts hosts (not headers) without keys and sessions belong to the
key that started them with keys."""

from __future__ import annotations

import threading
import time

import pytest

from client.client import Client, ClientError
from tests.batches import count_taken
from tests.conftest import in_process_mesh, make_tiny_model, reference_greedy

PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("admission"), "gqa")


def slow_down(stage, seconds: float, only_prefill: bool = False) -> list[list[int]]:
    """Makes each forward of `stage` take `seconds` longer; returns the record of the token
    counts of every batch it runs (one list per batch, one count per step)."""
    record: list[list[int]] = []
    run = stage.batcher.run_batch

    def slow(jobs):
        sizes = [len(j.step.token_ids) for j in jobs]
        record.append(sizes)
        if not only_prefill or max(sizes) > 1:
            time.sleep(seconds)
        run(jobs)

    stage.batcher.run_batch = slow
    return record


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_busy_stage_is_waited_for_not_marked_down(model_dir):
    with in_process_mesh(model_dir, 2, step_timeout_s=0.3) as mesh:
        slow_down(mesh.stages[1], 1.0, only_prefill=True)  # a prefill takes 3x the deadline
        reply = mesh.client.generate(token_ids=PROMPT, max_new_tokens=5)
        assert reply.token_ids == reference_greedy(model_dir, PROMPT, 5)
        assert mesh.orchestrator.router.pool.down() == []


def test_long_prompts_go_in_chunks_and_a_burst_waits_for_the_prefill_budget(model_dir):
    prompts = [[1 + (7 * i + 3 * k) % 100 for k in range(100)] for i in range(6)]  # no 0: pad
    expected = [reference_greedy(model_dir, p, 4) for p in prompts]
    options = dict(prefill_chunk_tokens=16, prefill_tokens_in_flight=32)
    with in_process_mesh(model_dir, 2, **options) as mesh:
        batches = slow_down(mesh.stages[0], 0.01)
        results: dict[int, list[int]] = {}

        def generate(i: int) -> None:
            results[i] = mesh.client.generate(token_ids=prompts[i], max_new_tokens=4).token_ids

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [results[i] for i in range(6)] == expected
    prefill = [[n for n in sizes if n > 1] for sizes in batches]
    assert max(n for sizes in prefill for n in sizes) == 16  # no step carries more
    assert max(sum(sizes) for sizes in prefill) <= 32  # never more than the budget at once
    assert sum(map(sum, prefill)) >= 6 * 100 - 6  # every prompt went through, in chunks


def test_a_caller_that_gives_up_stops_its_generation_and_frees_its_session(model_dir):
    with in_process_mesh(model_dir, 2, max_sessions_per_client=1) as mesh:
        slow_down(mesh.stages[1], 0.02)
        t0 = time.monotonic()
        with Client(mesh.address, timeout_s=1.0) as impatient, pytest.raises(ClientError) as err:
            impatient.generate(token_ids=PROMPT, max_new_tokens=200)
        assert err.value.code == "DEADLINE_EXCEEDED"
        generator = mesh.orchestrator.generator
        assert wait_until(lambda: not generator._active, 3), "the generation kept running"
        stopped_at = time.monotonic() - t0
        assert all(len(s.loaded.cache) == 0 for s in mesh.stages), "its caches were kept"
        taken = [count_taken(s) for s in mesh.stages]
        time.sleep(0.3)
        assert [t() for t in taken] == [0] * len(taken), "the stages still compute for it"
        # and the client's one session is free again
        reply = mesh.client.generate(token_ids=PROMPT, max_new_tokens=3)
        assert len(reply.token_ids) == 3, stopped_at


def test_without_keys_the_cap_counts_the_host_whatever_header_is_sent(model_dir):
    with in_process_mesh(model_dir, 1, max_sessions_per_client=4) as mesh:
        slow_down(mesh.stages[0], 0.02)
        clients = [Client(mesh.address, timeout_s=60, api_key=f"random-{i}") for i in range(6)]
        streams = [c.stream(token_ids=PROMPT, max_new_tokens=200) for c in clients]
        outcomes = []
        for s in streams:
            try:
                next(s)
                outcomes.append("running")
            except ClientError as err:
                outcomes.append(err.code)
        assert outcomes == ["running"] * 4 + ["RESOURCE_EXHAUSTED"] * 2
        for c in clients:
            c.close()


def test_with_keys_a_session_belongs_to_the_key_that_started_it(model_dir, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("key-a client\nkey-b client\nkey-admin admin\n")
    with in_process_mesh(model_dir, 1, api_keys_file=str(keys)) as mesh:
        slow_down(mesh.stages[0], 0.02)
        a, b, admin = (Client(mesh.address, timeout_s=60, api_key=k) for k in
                       ("key-a", "key-b", "key-admin"))  # fmt: skip
        stream = a.stream(token_ids=PROMPT, max_new_tokens=200, session_id="a-1")
        first = next(stream)
        with pytest.raises(ClientError) as err:
            b.end_session("a-1")
        assert err.value.code == "PERMISSION_DENIED" and "another API key" in err.value.message
        mesh.stage_servers[0].stop(0)  # the stage goes away: the session is suspended
        with pytest.raises(ClientError) as err:
            list(stream)
        assert err.value.code == "UNAVAILABLE" and "a-1" in err.value.message
        with pytest.raises(ClientError) as err:
            b.generate(token_ids=[1], max_new_tokens=200, session_id="a-1")  # resume: not b's
        assert err.value.code == "PERMISSION_DENIED"
        assert mesh.orchestrator.generator.is_suspended("a-1")
        assert admin.end_session("a-1") == 0  # an admin may end it; nothing was cached any more
        assert not mesh.orchestrator.generator.is_suspended("a-1") and first.token_ids
        for c in (a, b, admin):
            c.close()
