"""Drafters for speculative decoding: guesses of the next tokens, which the last stage verifies
(stage_service/verify.py). A drafter `start`s a session's drafting state from its prompt (and
`close`s when the orchestrator does); the session `propose`s up to k tokens to follow the text so
far. A drafter proposes one token per position (a point mass), which is what keeps the output
exactly the model's.

- PromptLookup: the latest earlier occurrence of the text's last n-gram (n = 3, then 2, then 1)
  in the prompt and the text so far; what followed it is the guess. No model.
- DraftModel (orchestrator/draft_model.py): a small model with the same vocabulary, greedy.
"""

from __future__ import annotations

from typing import Protocol


class DraftSession(Protocol):
    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens guessed to follow `tokens` (the prompt and every token generated so
        far; it only grows, or shrinks back to a prefix after a rejection)."""

    def close(self) -> None:
        """Frees what the session holds."""


class Drafter(Protocol):
    def start(self, prompt_ids: list[int]) -> DraftSession:
        """A session's drafting state."""

    def close(self) -> None:
        """Frees what the drafter holds (the orchestrator is closing)."""


MAX_NGRAM = 3


class LookupSession:
    """An index of every n-gram (n <= MAX_NGRAM) of the text to where it last ended, grown as
    the text grows; a lookup is a dict access per n."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> end of its latest occurrence

    def _sync(self, tokens: list[int]) -> None:
        """Indexes the n-grams of `tokens` that end before its last position (each must have a
        token after it to guess from)."""
        same = len(self.tokens) <= len(tokens) and tokens[: len(self.tokens)] == self.tokens
        if not same:  # not a continuation of what is indexed: start over
            self.tokens, self.index = [], {}
        for end in range(max(1, len(self.tokens)), len(tokens)):
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self.index[tuple(tokens[end - n : end])] = end
        self.tokens = list(tokens)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0 or not tokens:
            return []
        self._sync(tokens)
        for n in range(min(MAX_NGRAM, len(tokens) - 1), 0, -1):
            end = self.index.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end : end + k]
        return []

    def close(self) -> None:
        self.index = {}


class PromptLookup:
    def start(self, prompt_ids: list[int]) -> LookupSession:
        return LookupSession()

    def close(self) -> None:
        pass  # nothing held beyond the sessions
