"""The orchestrator's Prometheus metrics, served at GET /metrics on the HTTP port.

Counted where every generation passes, gRPC or HTTP alike (Generator.run): requests by outcome,
time to first token, time per output token, prompt and generated tokens, cache replays, drafted
and kept tokens (speculative decoding) and their ratio. Read at
scrape time: active and suspended sessions, the plan epoch, reloads, failovers, and each stage's
KV cache (bytes used and budget, from its Info).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from protos.errors import LlamadistError
from protos.status import code_of

log = logging.getLogger(__name__)

# Seconds: 5 ms (a GPU decode step) to 60 s (a long prompt on a CPU mesh).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The HTTP API's refusals that have no gRPC error of their own, as the gRPC door spells them.
HTTP_OUTCOMES = {404: "not_found", 413: "resource_exhausted", 401: "unauthenticated"}


class OrchestratorMetrics:
    def __init__(self, orch):
        self.orch = orch
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "llamadist_requests", "Generations ended, by outcome (finish reason or error)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "llamadist_time_to_first_token_seconds", "Time from request to first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "llamadist_time_per_output_token_seconds",
            "Mean time per generated token after the first, per generation",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "llamadist_prompt_tokens", "Prompt tokens of generations", registry=r
        )
        self.generation_tokens = Counter(
            "llamadist_generation_tokens", "Tokens generated", registry=r
        )
        self.replays = Counter(
            "llamadist_replays", "Session caches rebuilt from their history", registry=r
        )
        self.drafted = Counter(
            "llamadist_draft_tokens", "Speculative decoding: tokens drafted and verified",
            registry=r,
        )  # fmt: skip
        self.accepted = Counter(
            "llamadist_accepted_draft_tokens", "Speculative decoding: drafted tokens kept",
            registry=r,
        )  # fmt: skip
        r.register(_Acceptance(self))
        self.reloads = Counter(
            "llamadist_plan_reloads", "Plan reloads, by outcome", ["outcome"], registry=r
        )
        r.register(_Live(orch))

    @contextlib.contextmanager
    def refusals(self) -> Iterator[None]:
        """Counts a request refused before its generation starts (a field check, an unknown
        model, a prompt too long), by the door that read it: `observe` counts the rest, so
        each request is counted once."""
        try:
            yield
        except Exception as err:
            self.requests.labels(outcome_of(err)).inc()
            raise

    def observe(self, chunks: Iterator, prompt_tokens: int) -> Iterator:
        """Passes a generation's chunks through, counting them. Its prompt tokens are counted
        by the Generator once it is admitted (`admitted`), never for a refused prompt."""
        t0 = time.perf_counter()
        first_at, count, outcome, session_id = None, 0, "cancelled", ""
        try:
            for chunk in chunks:
                session_id = chunk.session_id
                if first_at is None:
                    first_at = time.perf_counter()
                    self.ttft.observe(first_at - t0)
                count += len(chunk.token_ids)
                if chunk.finish_reason:
                    outcome = chunk.finish_reason
                    if chunk.timings is not None:
                        self.replays.inc(chunk.timings.replays)
                        self.drafted.inc(chunk.timings.drafted_tokens)
                        self.accepted.inc(chunk.timings.accepted_tokens)
                yield chunk
        except GeneratorExit:  # its client went away
            outcome = "cancelled"
            raise
        except Exception as err:
            outcome = outcome_of(err)
            raise
        finally:
            self.requests.labels(outcome).inc()
            log.info(
                "generation %s: %s, %d prompt + %d generated tokens in %.3f s",
                session_id or "(refused)", outcome, prompt_tokens, count,
                time.perf_counter() - t0, extra={"session_id": session_id},
            )  # fmt: skip
            self.generation_tokens.inc(count)
            if first_at is not None and count > 1:
                self.tpot.observe((time.perf_counter() - first_at) / (count - 1))

    def admitted(self, prompt_tokens: int) -> None:
        """A generation was admitted: its prompt tokens count (a resume adds none)."""
        self.prompt_tokens.inc(prompt_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Acceptance:
    """The share of drafted tokens kept so far (0 before any draft), for dashboards without
    PromQL rate arithmetic."""

    def __init__(self, metrics: OrchestratorMetrics):
        self.metrics = metrics

    def collect(self):
        registry = self.metrics.registry
        drafted = registry.get_sample_value("llamadist_draft_tokens_total") or 0.0
        accepted = registry.get_sample_value("llamadist_accepted_draft_tokens_total") or 0.0
        yield _gauge(
            "llamadist_draft_acceptance_ratio",
            "Speculative decoding: drafted tokens kept over tokens drafted, since start",
            accepted / drafted if drafted else 0.0,
        )


class _Live:
    """Values read from the orchestrator when scraped."""

    def __init__(self, orch):
        self.orch = orch

    def collect(self):
        orch, gen = self.orch, self.orch.generator
        yield _gauge("llamadist_active_sessions", "Generations running", len(gen._active))
        yield _gauge(
            "llamadist_suspended_sessions", "Sessions suspended, resumable", len(gen._suspended)
        )
        plan = orch.router.plan
        yield _gauge(
            "llamadist_plan_epoch", "Epoch of the plan in force", plan.epoch if plan else 0
        )
        failovers = CounterMetricFamily(
            "llamadist_failovers", "Stage replicas found down (each one a failover)"
        )
        failovers.add_metric([], orch.router.pool.marked_down)
        yield failovers
        used = GaugeMetricFamily(
            "llamadist_stage_kv_used_bytes", "KV cache bytes in use", labels=["stage"]
        )
        budget = GaugeMetricFamily(
            "llamadist_stage_kv_budget_bytes", "KV cache budget", labels=["stage"]
        )
        for stage in orch.router.stages:
            try:
                info = stage.info()
            except LlamadistError:
                continue  # a stage down: no sample (the failover counter tells)
            used.add_metric([stage.address], info.kv_used_bytes)
            budget.add_metric([stage.address], info.kv_budget_bytes)
        yield used
        yield budget


def outcome_of(err: BaseException) -> str:
    """The one spelling of an error's outcome: its status code's name in lower case
    (`invalid_argument`, `cancelled`, ...), the same on both doors; anything else `internal`."""
    if isinstance(err, LlamadistError):
        return code_of(err).name.lower()
    status = getattr(err, "status", None)  # the HTTP API's own refusals (openai_api.HttpError)
    return HTTP_OUTCOMES.get(status, "internal")


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g
