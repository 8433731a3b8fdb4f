"""Fuzz the OpenAI-compatible HTTP API (issue 23): random JSON bodies for both completion
endpoints, with every field the API reads given a valid value or any JSON value (huge integers,
NaN and Infinity, strings, lists and objects), unknown fields, arrays and objects nested up to
200,000 deep, bytes that are not JSON and bodies over the size limit, sent to a real mesh.

Every answer must be a refusal with an OpenAI error body (400, 404, 413, 429) or a served
completion (200); a 500 (an error the API did not foresee) or a hang fails, and afterwards a
valid request is still served. The seed comes from LLAMADIST_FUZZ_SEED, else random, and is
printed in every failure."""

from __future__ import annotations

import json
import os
import random
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from orchestrator.server import start_http
from tests.conftest import in_process_mesh, make_tokenizer_model

pytestmark = pytest.mark.slow

EXAMPLES = 300
REFUSALS = {400, 404, 413, 429}
SEED = int(os.environ.get("LLAMADIST_FUZZ_SEED") or random.randrange(2**32))
CHAT = [{"role": "user", "content": "Hi"}]

ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: past 64 bits too
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "x"])},
    optional={"content": st.text(max_size=40) | ANY_JSON, "name": ANY_JSON},
)
# Valid values for each field the API reads...
VALID = {
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "developer"]),
                "content": st.text(max_size=40),
            }
        ),
        min_size=1,
        max_size=3,
    ),
    "prompt": st.text(min_size=1, max_size=40)
    | st.lists(st.integers(3, 90), min_size=1, max_size=8),
    "model": st.just("tiny-chat"),
    "max_tokens": st.integers(1, 4),
    "max_completion_tokens": st.integers(1, 4),
    "temperature": st.just(0) | st.floats(0.001, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 60_000),
    "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.booleans() | st.integers(0, 5),  # chat takes only true/false
}
# ...and values on and past their edges.
EDGES = {
    "messages": st.lists(MESSAGE, max_size=3),
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 60_000), max_size=8),
    "model": st.sampled_from(["gpt-4", ""]),
    "max_tokens": st.integers(-2, 2**40),
    "max_completion_tokens": st.integers(-2, 300),
    "temperature": st.floats(-1, 1e6),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 2**40),
    "repetition_penalty": st.floats(-1, 1e6),
    "seed": st.integers(-(2**66), 2**66),
    "stop": st.lists(st.text(max_size=40), max_size=9),
    "n": st.integers(-1, 3),
    "stream": ANY_JSON,
    "stream_options": ANY_JSON,
    "logprobs": st.integers(-1, 30),
}


@st.composite
def bodies(draw) -> bytes:
    """Half the bodies hold only valid values (most of them are served), half anything."""
    anything = draw(st.booleans())
    body = {} if anything else {"messages": CHAT, "prompt": "Hi"}
    for name, valid in VALID.items():
        if draw(st.integers(0, 2)) == 0:
            continue
        wild = st.one_of(EDGES[name], ANY_JSON)
        body[name] = draw(wild if anything and draw(st.booleans()) else valid)
    body.setdefault("max_tokens", draw(st.integers(1, 4)))  # keep the served ones short
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.text(min_size=1, max_size=10))] = draw(ANY_JSON)  # a field we do not read
    raw = json.dumps(body).encode()  # NaN and Infinity as Python writes them
    kind = draw(st.sampled_from(["json"] * 12 + ["deep", "bytes", "cut"]))
    if kind == "deep":  # a field nested deep: RecursionError territory
        depth = draw(st.sampled_from([900, 5_000, 200_000]))
        field = draw(st.sampled_from(list(VALID)))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        value = opener * depth + b"1" + closer * depth
        raw = raw[:-1] + (b", " if len(raw) > 2 else b"") + f'"{field}": '.encode() + value + b"}"
    elif kind == "bytes":
        raw = draw(st.binary(max_size=64))
    elif kind == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_model):
    model = make_tokenizer_model(tmp_path_factory.mktemp("fuzz-http") / "tiny-chat", default_model)
    with in_process_mesh(model, 2, max_sessions_per_client=4, http_max_body_mb=1) as mesh:
        http = start_http(mesh.config, mesh.orchestrator, port=0)
        try:
            yield mesh, f"http://127.0.0.1:{http.port}"
        finally:
            http.stop()


def judge(reply: httpx.Response, raw: bytes) -> int:
    where = (
        f"(LLAMADIST_FUZZ_SEED={SEED}) body {raw[:200]!r}: {reply.status_code} {reply.text[:300]}"
    )
    if reply.status_code == 200:
        if reply.headers["content-type"].startswith("text/event-stream"):
            events = [line for line in reply.text.splitlines() if line.startswith("data: ")]
            assert events and events[-1] == "data: [DONE]", where
        else:
            assert reply.json()["choices"], where
        return 200
    assert reply.status_code in REFUSALS, where
    error = reply.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in reply.text, where
    return reply.status_code


def test_fuzz_the_http_api(served):
    mesh, url = served
    statuses: Counter[tuple[str, int]] = Counter()
    http = httpx.Client(timeout=30)

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(raw=bodies(), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def one_request(raw: bytes, path: str) -> None:
        statuses[path, judge(http.post(url + path, content=raw), raw)] += 1

    one_request()
    big = json.dumps({"messages": CHAT, "x": "y" * (2**20 + 10)}).encode()
    statuses["big", judge(http.post(url + "/v1/chat/completions", content=big), big)] += 1
    print(f"LLAMADIST_FUZZ_SEED={SEED}", sorted(statuses.items()))
    assert statuses["big", 413] == 1
    served_ok = sum(n for (_, code), n in statuses.items() if code == 200)
    assert served_ok >= 10, statuses  # past the refusals, often enough to mean something
    reply = http.post(url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    assert not mesh.orchestrator.generator._active
