"""The model's tokenizer and end-of-sequence ids, loaded from the model directory (never a hub).
A model directory without tokenizer files (tests' tiny random models) serves token ids only.

transformers' `AutoTokenizer` imports torch (through its model configs) even to tokenize; where
it would pick the generic fast tokenizer anyway, that class is loaded directly (`load_hf`), so
the orchestrator process never imports torch for the default model.
"""

from __future__ import annotations

import json
from pathlib import Path

from protos.errors import FailedPrecondition, InvalidArgument

# tokenizer_config.json classes that AutoTokenizer resolves to transformers' TokenizersBackend
# (PreTrainedTokenizerFast is its old name) for a Llama model without custom tokenizer code.
GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_hf(model_dir: Path):
    """The tokenizer AutoTokenizer.from_pretrained(model_dir) makes; the generic fast class is
    loaded without AutoTokenizer's detour through torch (tests/test_torch_free.py checks both
    that and the equality)."""
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    if (
        tokenizer_config.get("tokenizer_class") in GENERIC_FAST
        and "auto_map" not in tokenizer_config
        and _read_json(model_dir / "config.json").get("model_type") == "llama"
    ):
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def eos_token_ids(model_dir: Path, tokenizer=None) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Tokenizer:
    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        self.hf = None
        if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file():
            self.hf = load_hf(model_dir)
        self.eos_ids = eos_token_ids(model_dir, self.hf)

    def _require(self, what: str):
        if self.hf is None:
            raise FailedPrecondition(
                f"the model has no tokenizer; {what} needs one (send token ids)"
            )
        return self.hf

    def encode(self, prompt: str) -> list[int]:
        """As AutoTokenizer does by default (special tokens added where the model adds them)."""
        if not prompt:
            raise InvalidArgument("the prompt is empty")
        return list(self._require("a text prompt")(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self._require("chat")
        if not messages:
            raise InvalidArgument("the chat has no messages")
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise InvalidArgument(f"chat role must be system, user or assistant: {m['role']!r}")
        if tok.chat_template is None:
            raise FailedPrecondition("the model has no chat template; send a plain prompt")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        if self.hf is None:
            return ""
        return self.hf.decode(ids, skip_special_tokens=True)
