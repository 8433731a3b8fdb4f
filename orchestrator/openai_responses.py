"""The OpenAI-shaped response bodies of one completion (whole, or as server-sent events), built
from the Generator's chunks for orchestrator/openai_api.py."""

from __future__ import annotations

import json
import time
import uuid

from orchestrator.generation import Chunk

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class CompletionBuilder:
    """Builds the OpenAI response bodies of one completion: whole, or streamed piece by piece
    as server-sent events."""

    def __init__(self, chat: bool, model: str, logprobs: bool, decode=None):
        self.chat, self.model, self.logprobs = chat, model, logprobs
        self.decode = decode or (lambda ids: "")  # token ids -> text, for logprobs' tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.generated = 0

    def _object(self, stream: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if stream else "chat.completion"
        return "text_completion"

    def _base(self, stream: bool) -> dict:
        return {
            "id": self.id, "object": self._object(stream), "created": self.created,
            "model": self.model,
        }  # fmt: skip

    def _logprobs(self, chunk: Chunk) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {
                "content": [
                    {"token": self.decode([t]), "logprob": lp, "bytes": None, "top_logprobs": []}
                    for t, lp in zip(chunk.token_ids, chunk.logprobs, strict=False)
                ]
            }
        tokens = [self.decode([t]) for t in chunk.token_ids]
        return {"tokens": tokens, "token_logprobs": chunk.logprobs}

    def _choice(self, text: str, finish: str | None, logprobs, stream: bool, role: bool = False):
        choice = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
        if not self.chat:
            return choice | {"text": text}
        if stream:
            delta = {"role": "assistant"} if role else {}
            return choice | {"delta": delta | ({"content": text} if text or not role else {})}
        return choice | {"message": {"role": "assistant", "content": text}}

    def usage(self, prompt: int, completion: int) -> dict:
        return {
            "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }  # fmt: skip

    def whole(self, chunks: list[Chunk]) -> dict:
        text = "".join(c.text for c in chunks)
        ids = [t for c in chunks for t in c.token_ids]
        lps = [lp for c in chunks for lp in c.logprobs]
        merged = Chunk(ids, lps, text, chunks[-1].session_id if chunks else "")
        finish = FINISH.get(chunks[-1].finish_reason if chunks else "", "stop")
        prompt = chunks[-1].prompt_tokens if chunks else 0
        return self._base(False) | {
            "choices": [self._choice(text, finish, self._logprobs(merged), stream=False)],
            "usage": self.usage(prompt, len(ids)),
        }

    def opening(self) -> dict:
        if not self.chat:
            return self._base(True) | {"choices": [self._choice("", None, None, True)]}
        return self._base(True) | {"choices": [self._choice("", None, None, True, role=True)]}

    def piece(self, chunk: Chunk) -> dict:
        self.generated += len(chunk.token_ids)
        finish = FINISH.get(chunk.finish_reason) if chunk.finish_reason else None
        choice = self._choice(chunk.text, finish, self._logprobs(chunk), stream=True)
        return self._base(True) | {"choices": [choice]}

    def usage_chunk(self, last: Chunk) -> dict:
        return self._base(True) | {
            "choices": [], "usage": self.usage(last.prompt_tokens, self.generated),
        }  # fmt: skip

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"
