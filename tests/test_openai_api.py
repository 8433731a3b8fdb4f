"""The OpenAI-compatible HTTP API, reached by the official `openai` package and by httpx (for
error bodies and a disconnect), on a real mesh: greedy text through HTTP equals the gRPC
Generate's for the same input."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from openai import APIStatusError, OpenAI

from orchestrator.server import start_http
from protos import llamadist_pb2 as pb
from tests.conftest import in_process_mesh, make_tokenizer_model

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model):
    return make_tokenizer_model(tmp_path_factory.mktemp("openai") / "tiny-chat", default_model)


@pytest.fixture(scope="module")
def served(model_dir):
    with in_process_mesh(model_dir, 2, max_sessions_per_client=2) as mesh:
        http = start_http(mesh.config, mesh.orchestrator, port=0)
        try:
            yield mesh, f"http://127.0.0.1:{http.port}/v1"
        finally:
            http.stop()


def sdk(url: str) -> OpenAI:
    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_equals_grpc_generate(served, model_dir):
    mesh, url = served
    reply = sdk(url).chat.completions.create(
        model=model_dir.name, messages=CHAT, max_tokens=12, temperature=0
    )
    expected = mesh.client.generate(messages=CHAT, max_new_tokens=12)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens == expected.prompt_tokens


def test_streamed_chat_completion_with_usage(served, model_dir):
    mesh, url = served
    stream = sdk(url).chat.completions.create(
        model=model_dir.name, messages=CHAT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = mesh.client.generate(messages=CHAT, max_new_tokens=10)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_with_stop_and_models(served, model_dir):
    mesh, url = served
    client = sdk(url)
    full = client.completions.create(
        model=model_dir.name, prompt="The capital of France is", max_tokens=16, temperature=0
    )
    text = full.choices[0].text
    assert len(text) > 4
    stop = text[2:4]  # a string the greedy text reaches
    cut = client.completions.create(
        model=model_dir.name, prompt="The capital of France is", max_tokens=16,
        temperature=0, stop=[stop],
    )  # fmt: skip
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text and text.startswith(cut.choices[0].text)
    models = client.models.list().data
    assert [m.id for m in models] == [model_dir.name]
    extra = models[0].model_extra
    assert extra["context_length"] == int(mesh.client.plan()["max_context"])
    assert extra["plan_epoch"] == int(mesh.client.plan()["epoch"])


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"messages": CHAT, "n": 2}, 400, "n must be 1"),
        ({"messages": CHAT, "model": "gpt-4"}, 404, "does not exist"),
        ({"messages": []}, 400, "messages"),
        ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"messages": CHAT, "max_tokens": 10**7}, 400, ""),
    ],
)
def test_bad_requests_get_openai_error_bodies(served, body, status, words):
    _, url = served
    reply = httpx.post(f"{url}/chat/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["type"] and "Traceback" not in reply.text


def test_not_json_and_the_sdk_sees_the_status(served, model_dir):
    _, url = served
    reply = httpx.post(f"{url}/completions", content=b"{not json", timeout=30)
    assert reply.status_code == 400 and "not JSON" in reply.json()["error"]["message"]
    with pytest.raises(APIStatusError) as err:
        sdk(url).chat.completions.create(model=model_dir.name, messages=CHAT, n=3)
    assert err.value.status_code == 400


def test_a_client_that_disconnects_mid_stream_frees_its_session(served, model_dir):
    mesh, url = served
    body = {"model": model_dir.name, "messages": CHAT, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "chat.completion.chunk"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        active = mesh.orchestrator.generator._active
        cached = sum(stage.info().get("active_sessions", 0) for stage in mesh.stages)
        if not active and cached == 0:
            break
        time.sleep(0.05)
    assert not mesh.orchestrator.generator._active
    assert sum(stage.info().get("active_sessions", 0) for stage in mesh.stages) == 0


def test_api_keys_apply_to_http(model_dir, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sekret client\n")
    with in_process_mesh(model_dir, 1, api_keys_file=str(keys)) as mesh:
        http = start_http(mesh.config, mesh.orchestrator, port=0)
        try:
            url = f"http://127.0.0.1:{http.port}/v1"
            assert httpx.get(f"{url}/models", timeout=10).status_code == 401
            wrong = {"authorization": "Bearer nope"}
            assert httpx.get(f"{url}/models", headers=wrong, timeout=10).status_code == 401
            client = OpenAI(base_url=url, api_key="sekret", max_retries=0)
            assert client.models.list().data[0].id == model_dir.name
        finally:
            http.stop()


def scrape(url: str) -> dict[str, float]:
    """/metrics parsed by prometheus_client's own parser: sample name + labels -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_metrics_count_what_was_served(served, model_dir):
    mesh, url = served
    before = scrape(url)
    client = sdk(url)
    n = 3
    for _ in range(n):
        client.completions.create(model=model_dir.name, prompt="Hello", max_tokens=4, temperature=0)
    mesh.client.generate("Hello", max_new_tokens=4)  # gRPC is counted too
    with pytest.raises(APIStatusError):
        client.completions.create(model=model_dir.name, prompt="Hello", max_tokens=10**7)
    after = scrape(url)

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("llamadist_requests_total{outcome=length}") == n + 1
    assert moved("llamadist_requests_total{outcome=invalid_argument}") == 1
    assert moved("llamadist_generation_tokens_total{}") == 4 * (n + 1)
    assert moved("llamadist_time_to_first_token_seconds_count{}") == n + 1
    assert moved("llamadist_time_per_output_token_seconds_count{}") == n + 1
    assert after["llamadist_active_sessions{}"] == 0
    assert after["llamadist_plan_epoch{}"] == int(mesh.client.plan()["epoch"])
    budgets = [v for k, v in after.items() if k.startswith("llamadist_stage_kv_budget_bytes")]
    assert len(budgets) == 2 and all(b == 64 * 2**20 for b in budgets)


def test_sampling_defaults_come_from_generation_config(served, model_dir):
    """The default model's generation_config.json (written by fetch-default: SmolLM2's
    recommended temperature 0.2, top_p 0.9) fills what a request leaves out, over HTTP and over
    gRPC alike; a value given wins."""
    mesh, url = served
    config = json.loads((model_dir / "generation_config.json").read_text())
    assert (config["temperature"], config["top_p"]) == (0.2, 0.9)
    filled = mesh.orchestrator.with_defaults(pb.SamplingParams())
    assert filled.temperature == pytest.approx(0.2) and filled.top_p == pytest.approx(0.9)
    client = sdk(url)
    left_out = client.chat.completions.create(
        model=model_dir.name, messages=CHAT, max_tokens=12, seed=7
    )
    given = client.chat.completions.create(
        model=model_dir.name, messages=CHAT, max_tokens=12, seed=7, temperature=0.2, top_p=0.9
    )
    assert left_out.choices[0].message.content == given.choices[0].message.content
    unset = dict(temperature=None, top_k=None, top_p=None, repetition_penalty=None)
    grpc_side = mesh.client.generate(messages=CHAT, max_new_tokens=12, seed=7, **unset)
    assert grpc_side.text == given.choices[0].message.content


def test_tls_with_the_services_certificate(served, model_dir, tmp_path):
    """With --tls-cert, the HTTP API speaks TLS only, with the same certificate as gRPC."""
    import dataclasses
    import ssl

    from client.certs import make_certs

    mesh, _ = served
    paths = make_certs(tmp_path / "tls", hosts=["127.0.0.1"])
    config = dataclasses.replace(
        mesh.config,
        tls_cert=str(paths["server.pem"]),
        tls_key=str(paths["server-key.pem"]),
        tls_ca=str(paths["ca.pem"]),
    )
    http = start_http(config, mesh.orchestrator, port=0)
    try:
        url = f"https://127.0.0.1:{http.port}/v1/models"
        trust = ssl.create_default_context(cafile=str(paths["ca.pem"]))
        reply = httpx.get(url, verify=trust, timeout=10)
        assert reply.status_code == 200 and reply.json()["data"][0]["id"] == model_dir.name
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http"), timeout=10)
    finally:
        http.stop()


def test_client_session_cap_is_429(served, model_dir):
    """max_sessions_per_client (2 here): a third concurrent generation of one client is 429."""
    mesh, url = served
    body = {"model": model_dir.name, "messages": CHAT, "max_tokens": 200, "stream": True}
    with (
        httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as one,
        httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as two,
    ):
        assert one.status_code == two.status_code == 200
        third = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        assert third.status_code == 429, third.text
        assert "limit per client" in third.json()["error"]["message"]


def test_no_stages_is_503(model_dir):
    """An orchestrator whose stages are not there yet: 503 with the reason, not a hang."""
    from orchestrator.config import OrchestratorConfig
    from orchestrator.server import build_server

    config = OrchestratorConfig(model=str(model_dir), port=0, stages=("127.0.0.1:9",))
    server, _, orch = build_server(config)  # not started: no plan
    http = start_http(config, orch, port=0)
    try:
        reply = httpx.post(
            f"http://127.0.0.1:{http.port}/v1/completions",
            json={"prompt": "Hello", "max_tokens": 4},
            timeout=30,
        )
        assert reply.status_code == 503 and "not ready" in reply.json()["error"]["message"]
    finally:
        http.stop()
        orch.close()


def test_logprobs_are_the_generated_tokens(served, model_dir):
    mesh, url = served
    reply = sdk(url).chat.completions.create(
        model=model_dir.name, messages=CHAT, max_tokens=6, temperature=0, logprobs=True
    )
    expected = mesh.client.generate(messages=CHAT, max_new_tokens=6)
    content = reply.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(expected.logprobs, abs=1e-5)
    assert "".join(c.token for c in content) == expected.text
