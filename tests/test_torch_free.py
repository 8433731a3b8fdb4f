"""The orchestrator and the client run without torch: importing them (in a fresh interpreter, as
their processes do) loads neither torch nor transformers, and the orchestrator's tokenizer for
the default model loads transformers' tokenizer without torch, equal to AutoTokenizer's. Only
the stages need torch: no client module imports it, at any level, but where the client runs a
stage's or a converter's code on purpose (the benchmark lives in bench/, above the client)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")
# Where a client module may import torch, transformers or the stage's code, and why.
CLIENT_MAY_IMPORT = {
    # `llamadist stage` runs a stage in this process; its flags (stage_service.config) load no torch
    "commands_services.py": {"stage_service.config", "stage_service.server"},
    # `llamadist model fetch-default` converts the GGUF with transformers, once
    "default_model.py": {"torch", "safetensors.torch", "transformers"},
}


def heavy_modules_after(code: str) -> list[str]:
    """Runs `code` in a fresh interpreter; the heavy modules it left in sys.modules."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, cwd=ROOT, capture_output=True, text=True
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "module",
    [
        "protos.shared.model_files",
        "orchestrator.orchestrator",
        "orchestrator.server",
        "client",
        "client.cli",
    ],
)
def test_importing_loads_no_torch_and_no_transformers(module):
    assert heavy_modules_after(f"import {module}") == []


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_client_module_imports_torch_or_the_stages_code():
    found = {}
    for path in sorted((ROOT / "client").glob("*.py")):
        heavy = {
            name
            for name in imported_modules(path)
            if name.split(".")[0] in (*HEAVY, "stage_service") or name == "safetensors.torch"
        }
        unexpected = heavy - CLIENT_MAY_IMPORT.get(path.name, set())
        if unexpected:
            found[path.name] = sorted(unexpected)
    assert found == {}


def test_the_default_models_tokenizer_loads_no_torch(default_model):
    code = (
        "from orchestrator.tokenizer import Tokenizer\n"
        f"tok = Tokenizer({str(default_model)!r})\n"
        "tok.decode(tok.encode_chat([{'role': 'user', 'content': 'Hi'}], 64))"
    )
    assert heavy_modules_after(code) == ["transformers"]


def test_the_tokenizer_is_the_one_auto_tokenizer_makes(default_model):
    from transformers import AutoTokenizer

    from orchestrator.tokenizer import Tokenizer, eos_token_ids

    ours, auto = Tokenizer(default_model), AutoTokenizer.from_pretrained(str(default_model))
    assert type(ours.hf) is type(auto)
    for prompt in ["The history of the Roman Empire", "  é 北京 <|im_start|>x\n\tz  ", "1234"]:
        ids = auto(prompt)["input_ids"]
        assert ours.encode(prompt, 64) == ids
        assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.encode_chat(chat, 64) == auto(text, add_special_tokens=False)["input_ids"]
    assert ours.eos_ids == eos_token_ids(default_model, auto)
