"""The draft-model drafter (--draft-model DIR): a small Llama-family model with the target's
vocabulary, run in the orchestrator's process by a Stage of its own (all its layers, greedy),
each session with its own cache there. A session drafts by feeding the tokens its cache lacks
(the cache is cut back to where they part from what it holds, as a stage cuts any step back),
then one greedy step per further token.

Greedy drafts are point masses, which the last stage's verification keeps exact
(stage_service/verify.py). A draft that fails (a prompt past the draft's context, a full cache)
proposes nothing: the step runs without drafts.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from pathlib import Path

from orchestrator.tokenizer import Tokenizer
from protos.errors import FailedPrecondition, InvalidArgument, LlamadistError
from protos.sampling import Sampling
from protos.shared.knobs import ConfigError
from protos.shared.model_files import LlamaArgs, TensorIndex, read_config
from stage_service.config import StageConfig
from stage_service.stage import Stage, StepInput

log = logging.getLogger(__name__)

DRAFT_KV_CACHE_MB = 256
GREEDY = Sampling()


def check_same_vocabulary(draft_dir: Path, target_dir: Path, target_vocab: int) -> None:
    """The draft must speak the target's token ids: the same vocabulary size, and the same
    tokenizer vocabulary where either directory has a tokenizer."""
    vocab = int(LlamaArgs.from_config(read_config(draft_dir)).vocab_size)
    if vocab != target_vocab:
        raise FailedPrecondition(
            f"it has a vocabulary of {vocab} tokens, the model {target_vocab}: give a draft "
            "model with the same tokenizer"
        )
    draft, target = Tokenizer(draft_dir).hf, Tokenizer(target_dir).hf
    if (draft is None) != (target is None):
        has, lacks = (draft_dir, target_dir) if target is None else (target_dir, draft_dir)
        raise FailedPrecondition(
            f"{has} has a tokenizer and {lacks} none: a draft model needs the model's tokenizer"
        )
    if draft is not None and draft.get_vocab() != target.get_vocab():
        raise FailedPrecondition(
            "it has another tokenizer than the model (their vocabularies differ): give a "
            "draft model with the same tokenizer"
        )
    TensorIndex(draft_dir)  # every safetensors file whole (a truncated copy named here)


class DraftModel:
    def __init__(self, draft_dir: Path, target_dir: Path, target_vocab: int):
        draft_dir = Path(draft_dir)
        try:
            check_same_vocabulary(draft_dir, Path(target_dir), target_vocab)
            self.stage = Stage(StageConfig(model=str(draft_dir), kv_cache_mb=DRAFT_KV_CACHE_MB))
            self.stage.load_layers(0, self.stage.args.num_layers, epoch=1)
        except (FailedPrecondition, InvalidArgument, ConfigError) as err:
            # one line naming the flag, the directory and (in `err`) the file and the fault
            raise FailedPrecondition(f"--draft-model {draft_dir}: {err}") from None

    def start(self, prompt_ids: list[int]) -> DraftModelSession:
        return DraftModelSession(self.stage)

    def close(self) -> None:
        self.stage.batcher.close()


class DraftModelSession:
    def __init__(self, stage: Stage):
        self.stage = stage
        self.session_id = "draft-" + uuid.uuid4().hex
        self.cached: list[int] = []  # the tokens whose K/V the draft stage holds

    def _step(self, start: int, tokens: list[int]) -> int:
        step = StepInput(self.session_id, 1, start, tokens, None, GREEDY)
        token = self.stage.run_step(step).token_id
        self.cached[start:] = tokens
        return token

    def propose(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0 or not tokens:
            return []
        same = 0
        limit = min(len(self.cached), len(tokens) - 1)  # the last token is fed: its logits
        while same < limit and self.cached[same] == tokens[same]:
            same += 1
        try:
            out = [self._step(same, tokens[same:])]
            while len(out) < k:
                out.append(self._step(len(self.cached), [out[-1]]))
        except LlamadistError as err:
            log.info("draft model: no draft (%s)", err)
            self.cached = []  # unknown state: start over next time
            return []
        return out

    def close(self) -> None:
        with contextlib.suppress(LlamadistError):  # nothing cached
            self.stage.end_session(self.session_id)
