"""The orchestrator's domain object: the router, the tokenizer and the generator, and the
start-up that waits for the stages and applies the first plan. No gRPC in here."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from orchestrator.config import OrchestratorConfig
from orchestrator.generation import Generator
from orchestrator.router import Router
from orchestrator.strategies import STRATEGIES
from orchestrator.tokenizer import Tokenizer
from protos.errors import LlamadistError, Unavailable
from stage_service.model import LlamaArgs
from stage_service.weights import model_fingerprint, read_config

log = logging.getLogger(__name__)


class Orchestrator:
    def __init__(self, config: OrchestratorConfig):
        self.config = config
        model_dir = Path(config.model)
        self.args = LlamaArgs.from_config(read_config(model_dir))
        self.fingerprint = model_fingerprint(model_dir)
        self.router = Router(list(config.stages), config.step_timeout_s)
        self.tokenizer = Tokenizer(model_dir)
        self.generator = Generator(
            self.router, self.tokenizer, self.args.vocab_size, self.args.max_position_embeddings
        )
        self.startup_error = ""
        self._started = threading.Event()

    def start(self) -> None:
        """Waits for the stages and applies the first plan; run it in a background thread so
        that Health answers (NOT_SERVING) meanwhile."""
        try:
            self.router.wait_for_stages(self.config.stage_wait_s, self.fingerprint)
            strategy = STRATEGIES[self.config.strategy]
            self.router.apply(strategy(self.args.num_layers, self.router.addresses))
            log.info("plan applied: %s", self.router.plan)
        except LlamadistError as err:
            self.startup_error = str(err)
            log.error("start-up failed: %s", err)
        finally:
            self._started.set()

    def ready(self) -> tuple[bool, str]:
        if self.router.plan is not None:
            return True, ""
        if self.startup_error:
            return False, f"start-up failed: {self.startup_error}"
        return False, "waiting for stages: " + ", ".join(self.config.stages)

    def require_ready(self) -> None:
        ok, detail = self.ready()
        if not ok:
            raise Unavailable(f"the orchestrator is not ready: {detail}")

    def close(self) -> None:
        self.router.close()
