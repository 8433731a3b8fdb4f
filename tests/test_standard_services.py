"""The standard gRPC services on every llamadist server: grpc.health.v1.Health follows the real
readiness our own Health RPC reports, and server reflection lists and describes the services
(what `grpcurl -plaintext host:port list` asks), through the official grpcio packages' clients."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from stage_service.config import StageConfig
from stage_service.server import build_server as build_stage
from tests.conftest import in_process_mesh, keyed_channel, make_tiny_model, stage_key

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_follows_readiness_of_a_stage_and_the_orchestrator(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    server, port, stage = build_stage(
        StageConfig(model=str(model_dir), port=0, kv_cache_mb=16, **stage_key())
    )
    server.start()
    try:  # no layers yet: our Health says NOT_SERVING, so does the standard one
        assert check(f"127.0.0.1:{port}") == NOT_SERVING
        assert check(f"127.0.0.1:{port}", "llamadist.Stage") == NOT_SERVING
        stage.load_layers(0, 4, epoch=1)
        assert check(f"127.0.0.1:{port}") == SERVING
        assert check(f"127.0.0.1:{port}", "llamadist.Stage") == SERVING
        with pytest.raises(grpc.RpcError) as err:
            check(f"127.0.0.1:{port}", "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(None)
    with in_process_mesh(model_dir, 2) as mesh:
        assert check(mesh.address) == SERVING
        assert check(mesh.address, "llamadist.Orchestrator") == SERVING
        assert all(check(a, "llamadist.Stage") == SERVING for a in mesh.addresses)


def test_reflection_lists_and_describes_the_services(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    with in_process_mesh(model_dir, 2) as mesh:
        for address, ours in [(mesh.address, "llamadist.Orchestrator")] + [
            (a, "llamadist.Stage") for a in mesh.addresses
        ]:
            stage = ours == "llamadist.Stage"  # a stage's reflection needs the stage key too
            with keyed_channel(address) if stage else grpc.insecure_channel(address) as channel:
                db = ProtoReflectionDescriptorDatabase(channel)
                services = set(db.get_services())
                assert {ours, "grpc.health.v1.Health"} <= services
                described = db.FindFileContainingSymbol(ours)
                assert described.package == "llamadist"
                methods = {m.name for s in described.service for m in s.method}
                assert ("Generate" if "Orchestrator" in ours else "ForwardStream") in methods


def test_stage_metrics_on_their_own_port(tiny_root):
    """--metrics-port: Prometheus text that prometheus_client parses, whose batch counts move
    with the forwards the stage ran and whose KV gauges follow Info."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    model_dir = make_tiny_model(tiny_root, "gqa")
    with in_process_mesh(model_dir, 1) as mesh:
        stage = mesh.stages[0]
        server = stage.metrics.serve("127.0.0.1", 0)
        try:
            url = f"http://127.0.0.1:{server.server_port}/metrics"

            def scrape() -> dict[str, float]:
                families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
                return {s.name: s.value for f in families for s in f.samples if not s.labels}

            before = scrape()
            mesh.client.generate(token_ids=[1, 2, 3], max_new_tokens=5)
            after = scrape()
        finally:
            server.shutdown()
    assert (
        after["llamadist_stage_batch_size_count"] - before["llamadist_stage_batch_size_count"] == 5
    )
    assert (
        after["llamadist_stage_step_compute_seconds_sum"]
        > before["llamadist_stage_step_compute_seconds_sum"]
    )
    assert after["llamadist_stage_kv_budget_bytes"] == 64 * 2**20
    assert after["llamadist_stage_weight_bytes"] == stage.info()["weight_bytes"]


def test_json_logs_are_one_object_per_line(capsys):
    import json
    import logging

    from protos.shared import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("json", "orchestrator")
        logging.getLogger("orchestrator.x").info("hello %s", "there", extra={"session_id": "s1"})
        logging.getLogger("orchestrator.y").warning("no session")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines[-2:])
    assert first["event"] == "hello there" and first["session_id"] == "s1"
    assert first["service"] == "orchestrator" and first["level"] == "info" and first["time"]
    assert "session_id" not in second and second["level"] == "warning"


def test_with_api_keys_health_is_open_and_reflection_needs_a_key(tiny_root, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sekret client\n")
    model_dir = make_tiny_model(tiny_root, "gqa")
    with in_process_mesh(model_dir, 1, api_keys_file=str(keys)) as mesh:
        assert check(mesh.address, "llamadist.Orchestrator") == SERVING  # probes send no key
        with grpc.insecure_channel(mesh.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def threads_left(before: set[threading.Thread], wait_s: float = 5.0) -> list[str]:
    """The threads started since `before` that are still alive after up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_stopped_servers_leave_no_thread_behind(tiny_root):
    """A process that goes on after stopping a stage or an orchestrator (tests, an embedding
    application) keeps none of their threads: the compute thread and the health watcher end
    with their server."""
    model_dir = make_tiny_model(tiny_root, "gqa")
    before = set(threading.enumerate())
    server, port, stage = build_stage(StageConfig(model=str(model_dir), port=0, **stage_key()))
    server.start()
    stage.load_layers(0, 4, epoch=1)
    assert check(f"127.0.0.1:{port}") == SERVING
    assert {"compute", "health-watch"} <= {t.name for t in threading.enumerate()}
    server.stop(0).wait()  # the stage itself is not closed by hand
    assert threads_left(before) == []
    with in_process_mesh(model_dir, 2) as mesh:
        assert mesh.client.generate(token_ids=[1, 2, 3], max_new_tokens=3).token_ids
    assert threads_left(before) == []
