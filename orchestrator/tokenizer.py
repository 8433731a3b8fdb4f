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
        # The most characters one token stands for (a vocabulary entry's length, which is its
        # byte count for byte-level vocabularies): a text longer than max_tokens times this
        # cannot fit in max_tokens, so it is refused before the tokenizer spends time on it.
        self.max_token_chars = max(map(len, self.hf.get_vocab()), default=1) if self.hf else 1

    def _check_length(self, chars: int, max_tokens: int, what: str) -> None:
        limit = max_tokens * self.max_token_chars
        if chars > limit:
            raise InvalidArgument(
                f"{what} has {chars} characters, more than the {max_tokens} tokens a session "
                f"may reach can hold ({limit} characters at {self.max_token_chars} per token "
                "at most): shorten it"
            )

    def _require(self, what: str):
        if self.hf is None:
            raise FailedPrecondition(
                f"the model has no tokenizer; {what} needs one (send token ids)"
            )
        return self.hf

    def encode(self, prompt: str, max_tokens: int) -> list[int]:
        """As AutoTokenizer does by default (special tokens added where the model adds them).
        A prompt that cannot fit in `max_tokens` by its length alone is refused untokenized."""
        if not prompt:
            raise InvalidArgument("the prompt is empty")
        tok = self._require("a text prompt")
        self._check_length(len(prompt), max_tokens, "the prompt")
        return list(tok(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]], max_tokens: int) -> list[int]:
        tok = self._require("chat")
        if not messages:
            raise InvalidArgument("the chat has no messages")
        self._check_length(sum(len(m["content"]) for m in messages), max_tokens, "the chat")
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
