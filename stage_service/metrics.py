"""A stage's Prometheus metrics, on `--metrics-port` (a stage has no HTTP API): the batches its
compute thread runs (sessions per forward, compute seconds per forward), and, read from Info
when scraped, its KV cache (bytes used, budget), sessions, weight bytes and plan epoch."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class StageMetrics:
    def __init__(self, info: Callable[[], dict]):
        """`info()`: the stage's Info fields, read at each scrape."""
        self.registry = r = CollectorRegistry()
        self.batch = Histogram(
            "llamadist_stage_batch_size", "Sessions per forward", buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.compute = Histogram(
            "llamadist_stage_step_compute_seconds", "Compute time per forward",
            buckets=COMPUTE_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_Live(info))

    def observe(self, sessions: int, compute_s: float) -> None:
        self.batch.observe(sessions)
        self.compute.observe(compute_s)

    def serve(self, host: str, port: int):
        """Serves /metrics on host:port (a thread of this process); returns the server."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


class _Live:
    def __init__(self, info: Callable[[], dict]):
        self.info = info

    def collect(self):
        info = self.info()
        for name, key, doc in (
            ("llamadist_stage_kv_used_bytes", "kv_used_bytes", "KV cache bytes in use"),
            ("llamadist_stage_kv_budget_bytes", "kv_budget_bytes", "KV cache budget"),
            ("llamadist_stage_active_sessions", "active_sessions", "Sessions with a cache"),
            ("llamadist_stage_weight_bytes", "weight_bytes", "Weight bytes held"),
            ("llamadist_stage_plan_epoch", "plan_epoch", "Epoch of the layers held"),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(info.get(key, 0)))
            yield g
