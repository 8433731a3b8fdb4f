"""Stop strings at their limits, over real gRPC: 16 strings of 256 characters are accepted, a
17th string or a 257th character (or an empty string) is INVALID_ARGUMENT, and a stop string
that occurs in the output cuts the text where it begins, with finish_reason "stop", also when it
spans two tokens. Stop strings need a tokenizer: a tiny random model gets the default model's."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.client import ClientError
from orchestrator.tokenizer import Tokenizer
from tests.conftest import in_process_mesh, make_tokenizer_model

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model) -> Path:
    return make_tokenizer_model(tmp_path_factory.mktemp("stop") / "tokenizer", default_model)


@pytest.fixture(scope="module")
def mesh(model_dir):
    with in_process_mesh(model_dir, 2) as m:
        yield m


def test_sixteen_stop_strings_of_256_characters_are_accepted(mesh):
    # CJK characters are 3 bytes each in UTF-8: the limit counts characters, not bytes
    stop = [chr(0x4E00 + i) * 256 for i in range(16)]
    reply = mesh.client.generate(PROMPT, max_new_tokens=6, ignore_eos=True, stop=stop)
    plain = mesh.client.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    assert reply.finish_reason == "length" and len(reply.token_ids) == 6
    assert reply.text == plain.text and reply.token_ids == plain.token_ids


@pytest.mark.parametrize(
    "stop",
    [
        [chr(0x4E00 + i) for i in range(17)],
        ["x" * 257],
        ["a" * 256, "b" * 257],
        [""],
    ],
    ids=["17-strings", "257-characters", "one-of-two-too-long", "empty"],
)
def test_too_many_or_too_long_stop_strings_are_refused(mesh, stop):
    with pytest.raises(ClientError) as err:
        mesh.client.generate(PROMPT, max_new_tokens=4, stop=stop)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "16 stop strings" in err.value.message and "256 characters" in err.value.message
    assert mesh.client.generate(PROMPT, max_new_tokens=2).token_ids  # still serving


def test_a_stop_string_in_the_output_cuts_the_text_where_it_begins(mesh, model_dir):
    full = mesh.client.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    assert full.finish_reason == "length"
    # a stop string across the boundary of the 4th and 5th generated tokens
    boundary = len(Tokenizer(model_dir).decode(full.token_ids[:4]))
    stop = full.text[boundary - 3 : boundary + 3]
    assert len(stop.strip()) >= 3, stop
    cut = full.text[: full.text.find(stop)]

    stopped = mesh.client.generate(PROMPT, max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == cut and stop not in stopped.text
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < len(full.token_ids)  # generation stopped there too
    pieces = list(mesh.client.stream(PROMPT, max_new_tokens=24, ignore_eos=True, stop=[stop]))
    assert "".join(p.text for p in pieces) == cut and pieces[-1].finish_reason == "stop"
