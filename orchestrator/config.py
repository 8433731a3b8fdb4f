"""The orchestrator process's one frozen config. Each field is a knob (protos/shared/knobs.py): its
default, help and check are written here once; `llamadist orchestrator` derives its flags and
the LLAMADIST_ORCHESTRATOR_<FIELD> environment defaults from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.plan_spec import (
    STRATEGIES,
    Strategy,
    parse_boundaries,
    parse_memory,
    spec_from_text,
)
from protos.errors import InvalidArgument
from protos.limits import MAX_DRAFT_TOKENS
from protos.sampling import SPECULATE_MODES
from protos.shared.knob_checks import host_port, in_range, non_negative, positive, readable_file
from protos.shared.knobs import ConfigError, ServiceConfig, knob, split_list
from protos.shared.stage_auth import key_file_problem

ENV_PREFIX = "LLAMADIST_ORCHESTRATOR"


def _addresses(stages: tuple[str, ...]) -> str | None:
    if not stages:
        return "needs at least one host:port"
    for group in stages:
        for address in group.split("+"):  # '+' joins replicas of one position
            if problem := host_port(address):
                return problem
    return None


def _strategy(name: str) -> None:
    Strategy.parse(name)  # the enum's own refusal, as PreviewPlan and ReloadPlan give it


def _memory(text: str) -> None:
    if text:
        parse_memory(text)  # raises InvalidArgument saying what is wrong


def _boundaries(text: str) -> None:
    if text:
        parse_boundaries(text)


def _draft_dir(path: str) -> str | None:
    if path and not (Path(path) / "config.json").is_file():
        return f"{path}: no config.json there (give a model directory)"
    return None


@dataclass(frozen=True, kw_only=True)
class OrchestratorConfig(ServiceConfig):
    port: int = ServiceConfig.knob_default("port", 50051)
    max_workers: int = ServiceConfig.knob_default("max_workers", 64)
    stages: tuple[str, ...] = knob(
        help="stage addresses in pipeline order, H:P,H:P,...; '+' joins replicas of one "
        "position (H:P+H:P,H:P): sessions spread over them and fail over between them",
        parse=split_list,
        check=_addresses,
        metavar="H:P,H:P",
    )
    strategy: str = knob(
        Strategy.UNIFORM.value,
        "uniform: equal layer counts; memory: within memory limits; compute: fastest by "
        "measured stage speed; mixed: compute within memory limits; custom: --boundaries",
        check=_strategy,
        metavar="|".join(STRATEGIES),
    )
    max_memory: str = knob(
        "",
        "memory limit for weights + KV: 4GB for every stage, or 4GB,8GB one per stage "
        "('' = each stage's free memory)",
        check=_memory,
    )
    boundaries: str = knob(
        "",
        "custom strategy: inclusive layer ranges such as 0-9,10-29",
        check=_boundaries,
    )
    stage_wait_s: float = knob(300.0, "wait this long for the stages at start", check=positive)
    step_timeout_s: float = knob(
        60.0,
        "a stage silent on a step this long is asked for its Health: one that answers is busy "
        "and waited for, one that does not is marked down (its sessions fail over)",
        check=positive,
    )
    prefill_chunk_tokens: int = knob(
        512,
        "most tokens one step carries: longer prompts and replays go in chunks of this many, "
        "so that no step holds a stage long",
        check=positive,
    )
    cohorts: int = knob(
        0,
        "decode batches in flight at once, each a cohort of the sessions (0 = auto: one when "
        "the stages share a GPU, one per stage on separate devices)",
        check=non_negative,
    )
    prefill_tokens_in_flight: int = knob(
        2048,
        "prefill tokens (prompt chunks, replays) in flight through the stages at once; more "
        "wait their turn in the orchestrator, decode steps never wait",
        check=positive,
    )
    sessions_file: str = knob(
        "",
        "on SIGTERM, sessions still running are suspended and saved here, and a start loads "
        "them, so that clients resume them by session id after a restart ('' = not kept)",
    )
    max_sessions_per_client: int = knob(
        32, "concurrent generations one client (API key, else host) may run", check=positive
    )
    api_keys_file: str = knob(
        "",
        "API keys file: one '<key> <role>' per line, role client (generate, chat, plan show, "
        "end sessions) or admin (also plan preview/reload); '#' starts a comment. Calls need "
        "'authorization: Bearer <key>' (missing or wrong: UNAUTHENTICATED; client key on an "
        "admin call: PERMISSION_DENIED); Health needs no key ('' = no keys needed)",
        check=readable_file,
    )
    stage_key_file: str = knob(
        "",
        "the mesh's stage key, the file its stages read: sent on every call to the stages, "
        "which refuse calls without it; not needed toward stages that take mutual TLS "
        "('' = none)",
        check=key_file_problem,
        metavar="FILE",
    )

    speculate: str = knob(
        "lookup",
        "speculative decoding (the output stays exactly the model's): lookup drafts from "
        "n-gram matches in the prompt and the text so far (the default: on the fixed prompt "
        "set it measured 1.5x on grounded prompts and 1.0x on chat on a CPU, 2.6x and 1.2x on "
        "an H200), draft runs --draft-model; a request may choose otherwise "
        "(generate --speculate)",
        choices=SPECULATE_MODES,
    )
    speculate_k: int = knob(
        4,
        f"most tokens drafted per step (1..{MAX_DRAFT_TOKENS}); each session adapts it to how "
        "many of its drafts are kept",
        check=in_range(1, MAX_DRAFT_TOKENS),
    )
    speculate_max_sessions: int = knob(
        4,
        "with more sessions decoding at once, steps draft nothing (batching them pays more)",
        check=positive,
    )
    draft_model: str = knob(
        "",
        "a small Llama-family model directory with the same tokenizer, run in the "
        "orchestrator's process, for --speculate draft ('' = none)",
        check=_draft_dir,
        metavar="DIR",
    )

    http_port: int = knob(
        -1,
        "serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /metrics) on this port, with the same API keys and TLS certificate "
        "(-1 = off, 0 = any free port)",
        check=in_range(-1, 65535),
    )
    http_max_body_mb: int = knob(
        8,
        "largest request the orchestrator reads, in MiB: an HTTP body over it is answered 413 "
        "before it is parsed, a gRPC request over it RESOURCE_EXHAUSTED before it is decoded",
        check=in_range(1, 256),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:  # the start-up plan request as a whole, as PreviewPlan and ReloadPlan check it
            spec_from_text(self.strategy, 0, self.max_memory, self.boundaries)
        except InvalidArgument as err:
            raise ConfigError(f"--strategy {self.strategy}: {err}") from None
        if self.speculate == "draft" and not self.draft_model:
            raise ConfigError("--speculate draft needs --draft-model DIR", "speculate")
