"""The draft-model drafter (--draft-model): greedy output equals transformers' generate and the
non-speculative path, whether the draft agrees with the model (the model as its own draft) or
mostly not (another random tiny model with the same vocabulary); seeded sampling is unchanged;
a draft with another vocabulary is refused at start."""

from __future__ import annotations

import json

import pytest

from orchestrator.config import OrchestratorConfig
from orchestrator.draft_model import DraftModel
from orchestrator.orchestrator import Orchestrator
from protos.errors import FailedPrecondition
from protos.sampling import Speculate
from tests.conftest import TINY_BASE, in_process_mesh, make_tiny_model, reference_greedy

PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]
NEW_TOKENS = 30


@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("draft", ["itself", "other"])
def test_draft_model_greedy_equals_transformers_and_plain(tiny_root, draft, num_stages):
    model_dir = make_tiny_model(tiny_root, "gqa")
    draft_dir = model_dir if draft == "itself" else make_tiny_model(tiny_root, "odd_layers_tied")
    expected = reference_greedy(model_dir, PROMPT, NEW_TOKENS)
    options = dict(speculate="draft", draft_model=str(draft_dir), speculate_k=3)
    with in_process_mesh(model_dir, num_stages, **options) as mesh:
        spec = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)
        plain = mesh.client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS, speculate="off")
        active = mesh.orchestrator.generator.speculation.drafters
    assert spec.token_ids == expected == plain.token_ids
    drafted, accepted = int(spec.timings["drafted_tokens"]), int(spec.timings["accepted_tokens"])
    assert drafted > 0
    if draft == "itself":  # the same weights pick the same tokens: every draft is kept
        assert accepted == drafted
    else:
        assert accepted < drafted  # the reject path ran
    assert len(active) == 2


def test_draft_sessions_are_freed(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    options = dict(speculate="draft", draft_model=str(model_dir))
    with in_process_mesh(model_dir, 1, **options) as mesh:
        for _ in range(2):
            mesh.client.generate(token_ids=PROMPT, max_new_tokens=8)
        draft = mesh.orchestrator.generator.speculation.drafters[Speculate.DRAFT]
        assert draft.stage.info()["active_sessions"] == 0


def test_seeded_sampling_with_a_draft_model_is_unchanged(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    options = dict(speculate="draft", draft_model=str(make_tiny_model(tiny_root, "llama3_rope")))
    sampling = dict(temperature=0.9, top_p=0.9, seed=42, repetition_penalty=1.2)
    with in_process_mesh(model_dir, 2, **options) as mesh:
        args = dict(token_ids=PROMPT, max_new_tokens=30, **sampling)
        plain = mesh.client.generate(speculate="off", **args)
        spec = mesh.client.generate(**args)
    assert spec.token_ids == plain.token_ids


def test_a_draft_with_another_vocabulary_is_refused(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**TINY_BASE, "vocab_size": 97}))
    config = OrchestratorConfig(
        model=str(model_dir), stages=("127.0.0.1:1",), draft_model=str(other)
    )
    with pytest.raises(FailedPrecondition, match="vocabulary of 97 tokens, the model 101"):
        Orchestrator(config)
    with pytest.raises(FailedPrecondition, match="same tokenizer"):
        DraftModel(other, model_dir, 101)


@pytest.mark.slow
def test_default_model_with_a_draft_model_generates_as_transformers(default_model):
    """The repo has no smaller sibling of the default model: it drafts for itself here, which
    exercises the path (not the speed)."""
    from transformers import AutoTokenizer

    prompt = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
    ids = AutoTokenizer.from_pretrained(str(default_model))(prompt)["input_ids"]
    expected = reference_greedy(default_model, ids, NEW_TOKENS)
    options = dict(speculate="draft", draft_model=str(default_model))
    with in_process_mesh(default_model, 2, **options) as mesh:
        result = mesh.client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        lookup = mesh.client.generate(
            prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, speculate="lookup"
        )
    assert result.token_ids == expected == lookup.token_ids
    assert int(result.timings["accepted_tokens"]) > 0


def broken_copies(model_dir, root):
    """Draft directories that are wrong in the three ways the issue found, each a copy of a
    good tiny model with one file broken."""
    import shutil

    cases = {}
    for name in ("garbage-config", "gpt2-config", "truncated-weights"):
        cases[name] = root / name
        shutil.copytree(model_dir, cases[name])
    (cases["garbage-config"] / "config.json").write_text("not json at all")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    gpt2 = {"model_type": "gpt2", "vocab_size": vocab, "n_embd": 64, "n_layer": 2, "n_head": 4}
    (cases["gpt2-config"] / "config.json").write_text(json.dumps(gpt2))
    weights = next(cases["truncated-weights"].glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return cases


@pytest.mark.parametrize(
    "case, words",
    [
        ("garbage-config", "config.json is not JSON"),
        ("gpt2-config", "'num_attention_heads'"),
        ("truncated-weights", ".safetensors"),
    ],
)
def test_bad_draft_model_directories_are_refused_in_one_line(
    tiny_root, tmp_path, capsys, case, words
):
    """Each refusal is one line naming the flag, the file and what is wrong, not a raw
    `Expecting value`, `unexpected KeyError` or `unexpected SafetensorError`."""
    from client.cli import main

    model_dir = make_tiny_model(tiny_root, "gqa")
    draft = broken_copies(model_dir, tmp_path)[case]
    argv = ["orchestrator", "--model", str(model_dir), "--stages", "127.0.0.1:1",
            "--speculate", "draft", "--draft-model", str(draft), "--port", "0"]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err, err
    line = err[-1]
    assert line.startswith("llamadist: error: --draft-model ") and "unexpected" not in line, line
    assert str(draft) in line and words in line, line
