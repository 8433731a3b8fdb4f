"""The orchestrator over real gRPC: statuses for bad requests, sampling, stop strings, chat,
cancellation, and a stage that cannot be reached."""

from __future__ import annotations

import threading

import pytest

from client.client import ClientError
from tests.conftest import in_process_mesh, make_tiny_model


@pytest.fixture(scope="module")
def tiny_mesh(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("orch"), "gqa")
    with in_process_mesh(model_dir, 2) as mesh:
        yield mesh


@pytest.mark.parametrize(
    "kwargs, code, needle",
    [
        (dict(token_ids=[]), "INVALID_ARGUMENT", "prompt is empty"),
        (dict(token_ids=[1, 500]), "INVALID_ARGUMENT", "outside the vocabulary"),
        (dict(token_ids=[1], max_new_tokens=300), "INVALID_ARGUMENT", "the 256 tokens"),
        (dict(token_ids=[1], max_new_tokens=-3), "INVALID_ARGUMENT", "max_new_tokens"),
        (dict(token_ids=[1], temperature=-1.0), "INVALID_ARGUMENT", "temperature"),
        (dict(token_ids=[1], top_p=1.5), "INVALID_ARGUMENT", "top_p"),
        (dict(prompt="hello"), "FAILED_PRECONDITION", "no tokenizer"),
        (dict(messages=[{"role": "user", "content": "hi"}]), "FAILED_PRECONDITION", "tokenizer"),
    ],
)
def test_bad_requests_get_precise_statuses(tiny_mesh, kwargs, code, needle):
    with pytest.raises(ClientError) as err:
        tiny_mesh.client.generate(**kwargs)
    assert err.value.code == code and needle in err.value.message
    assert tiny_mesh.client.generate(token_ids=[1, 2], max_new_tokens=2).token_ids  # still serving


def test_request_without_input_is_invalid(tiny_mesh):
    from protos import llamadist_pb2 as pb

    with pytest.raises(ClientError) as err:
        tiny_mesh.client._call(tiny_mesh.client.stub.Generate, pb.GenerateRequest())
    assert err.value.code == "INVALID_ARGUMENT" and "no input" in err.value.message


def test_seeded_sampling_is_reproducible_and_caches_are_freed(tiny_mesh):
    def run(seed: int) -> list[int]:
        return tiny_mesh.client.generate(
            token_ids=[3, 4, 5], max_new_tokens=24, temperature=1.0, top_k=20, seed=seed
        ).token_ids

    assert run(11) == run(11)
    assert run(11) != run(12)
    for stage in tiny_mesh.stages:
        assert stage.info()["active_sessions"] == 0


def test_concurrent_sessions_are_independent(tiny_mesh):
    prompts = [[i, i + 1, i + 2] for i in range(1, 9)]
    alone = [tiny_mesh.client.generate(token_ids=p, max_new_tokens=16).token_ids for p in prompts]
    together: list = [None] * len(prompts)

    def worker(i):
        together[i] = tiny_mesh.client.generate(token_ids=prompts[i], max_new_tokens=16).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_end_session_cancels_a_running_stream(tiny_mesh):
    stream = tiny_mesh.client.stream(token_ids=[1, 2], max_new_tokens=200, session_id="cancel-me")
    first = next(stream)
    assert first.session_id == "cancel-me"
    tiny_mesh.client.end_session("cancel-me")
    with pytest.raises(ClientError) as err:
        list(stream)
    assert err.value.code == "CANCELLED"
    with pytest.raises(ClientError) as err:
        tiny_mesh.client.end_session("cancel-me")
    assert err.value.code == "NOT_FOUND"


def test_a_stage_that_cannot_be_reached_is_named(tmp_path):
    model_dir = make_tiny_model(tmp_path, "gqa")
    with in_process_mesh(model_dir, 2) as mesh:
        mesh.stage_servers[1].stop(0)
        with pytest.raises(ClientError) as err:
            mesh.client.generate(token_ids=[1, 2], max_new_tokens=4)
        assert err.value.code == "UNAVAILABLE"
        assert f"stage 1 ({mesh.addresses[1]})" in err.value.message
        stages = mesh.client.stages()
        assert [s["reachable"] for s in stages] == [True, False]


def test_default_model_chat_stop_strings_and_eos(default_model):
    with in_process_mesh(default_model, 2) as mesh:
        answer = mesh.client.chat(
            [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=64
        )
        assert "Paris" in answer.text and answer.finish_reason == "eos"
        assert answer.token_ids[-1] == 2  # <|im_end|> ends it, and is not in the text
        stopped = mesh.client.generate("Count: one, two, three,", max_new_tokens=40, stop=["six"])
        full = mesh.client.generate("Count: one, two, three,", max_new_tokens=40, ignore_eos=True)
        streamed = "".join(
            p.text
            for p in mesh.client.stream("Count: one, two, three,", max_new_tokens=40, stop=["six"])
        )
    assert "six" in full.text, full.text  # the stop string does appear in the unstopped text
    assert stopped.finish_reason == "stop" and "six" not in stopped.text
    assert full.text.startswith(stopped.text) and streamed == stopped.text


@pytest.mark.parametrize("session_id", ["has space", "x" * 129, "semi;colon", "new\nline"])
def test_malformed_session_ids_are_refused(tiny_mesh, session_id):
    with pytest.raises(ClientError) as err:
        tiny_mesh.client.generate(token_ids=[1], max_new_tokens=2, session_id=session_id)
    assert err.value.code == "INVALID_ARGUMENT" and "session_id" in err.value.message
    with pytest.raises(ClientError) as err:
        tiny_mesh.client.end_session(session_id)
    assert err.value.code == "INVALID_ARGUMENT"


def test_a_client_over_its_session_cap_is_refused(tmp_path):
    model_dir = make_tiny_model(tmp_path, "gqa")
    with in_process_mesh(model_dir, 1, max_sessions_per_client=2) as mesh:
        streams = [mesh.client.stream(token_ids=[1, 2], max_new_tokens=200) for _ in range(2)]
        for s in streams:
            next(s)  # both are running now
        with pytest.raises(ClientError) as err:
            mesh.client.generate(token_ids=[1, 2], max_new_tokens=2)
        assert err.value.code == "RESOURCE_EXHAUSTED" and "limit per client" in err.value.message
        for s in streams:
            list(s)
        assert mesh.client.generate(token_ids=[1, 2], max_new_tokens=2).token_ids


def test_stages_max_context_is_the_plans_and_checked_before_any_step(tmp_path):
    """Stages serving --max-context 40 (of the model's 256): the plan says so, a request that
    would outgrow it is refused up front (not cut off mid-way), one that fits is served."""
    model_dir = make_tiny_model(tmp_path, "gqa")
    options = dict(static_kv="on", max_context=40, batch_invariant="off")
    with in_process_mesh(model_dir, 2, stage_options=options) as mesh:
        assert mesh.client.plan()["max_context"] == 40
        with pytest.raises(ClientError) as err:
            mesh.client.generate(token_ids=[1, 2, 3], max_new_tokens=38)
        assert err.value.code == "INVALID_ARGUMENT" and "the 40 tokens" in err.value.message
        reply = mesh.client.generate(token_ids=[1, 2, 3], max_new_tokens=37)
        assert len(reply.token_ids) == 37 and reply.finish_reason == "length"
