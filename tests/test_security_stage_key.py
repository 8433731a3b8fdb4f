"""Stage credentials (issue 23 item 9): every stage RPC but Health needs the mesh's stage key or
mutual TLS; a stage without either refuses to start; a stage dials only its plan's addresses."""

from __future__ import annotations

import logging
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import message

from client.cli import main
from client.client import Client
from client.launcher import LocalMesh
from orchestrator.config import OrchestratorConfig
from orchestrator.server import build_server as build_orchestrator
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.shared.knobs import ConfigError
from stage_service.config import StageConfig
from stage_service.server import build_server as build_stage
from tests.conftest import (
    STAGE_KEY_ENV,
    in_process_mesh,
    keyed_channel,
    make_tiny_model,
    reference_greedy,
    stage_key,
    stage_key_file,
)
from tests.secure_mesh import CLIENT_KEY


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("secure"), "gqa")


# ---------------------------------------------------------------------- stage credentials
# The mesh the issue attacked: API keys toward clients, no TLS. Its stages take the mesh's stage
# key (conftest gives the in-process mesh one); a caller without it is refused at every stage
# RPC but Health.

VICTIM_PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


@pytest.fixture(scope="module")
def keyed(model_dir, pki):
    with in_process_mesh(model_dir, 2, api_keys_file=pki.keys) as m:
        yield m


def user(mesh) -> Client:
    """A client of the mesh's orchestrator with a client API key."""
    return Client(mesh.address, 60, api_key=CLIENT_KEY)


def anonymous(address: str) -> pb_grpc.StageStub:
    """A caller who can reach the stage and holds nothing."""
    return pb_grpc.StageStub(grpc.insecure_channel(address))


def refused(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        reply = call(request, timeout=10, **kwargs)
        if not isinstance(reply, message.Message):  # a stream: read it
            list(reply)
    return err.value


def attacks(mesh, victim: str) -> dict:
    """Each stage RPC the issue abused, as a caller without the stage key sends it."""
    epoch = mesh.orchestrator.router.plan.epoch
    junk = pb.StepRequest(session_id=victim, plan_epoch=epoch, start_pos=0, token_ids=[1, 2, 3])
    return {
        "Info": ("Info", pb.InfoRequest()),
        "EndSession": ("EndSession", pb.EndSessionRequest(session_id=victim)),
        "LoadLayers (drop)": ("LoadLayers", pb.LoadLayersRequest(hold_nothing=True,
                                                                  plan_epoch=epoch + 1)),
        "LoadLayers (change)": ("LoadLayers", pb.LoadLayersRequest(
            layer_start=0, layer_end=1, plan_epoch=epoch + 1)),
        "Forward on a victim's session": ("Forward", junk),
        "ForwardStream": ("ForwardStream", iter([pb.StepBatch(steps=[junk], origin="x")])),
        "OfferWeights": ("OfferWeights", pb.WeightManifest(model_fingerprint="mine")),
        "PutWeights": ("PutWeights", iter([pb.WeightChunk(sha256="0" * 64, data=b"mine")])),
    }  # fmt: skip


def test_stage_rpcs_refuse_a_caller_without_the_stage_key(keyed, model_dir):
    with user(keyed) as c:
        before = c.plan()
    held = [(s.epoch, s.loaded.model.weights.span.start) for s in keyed.stages]
    for address in keyed.addresses:
        for name, (method, request) in attacks(keyed, "victim").items():
            err = refused(getattr(anonymous(address), method), request)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.code(), err.details())
            assert "stage key" in err.details() and "x-llamadist-stage-key" in err.details()
        health = anonymous(address).Health(pb.HealthRequest(), timeout=10)  # stays open
        assert health.status == pb.HealthReply.SERVING
    assert [(s.epoch, s.loaded.model.weights.span.start) for s in keyed.stages] == held
    with user(keyed) as c:
        assert c.plan() == before  # nothing changed: same plan, same layers
        out = c.generate(token_ids=VICTIM_PROMPT, max_new_tokens=4)
    assert out.token_ids == reference_greedy(model_dir, VICTIM_PROMPT, 4)


def test_a_forward_on_a_victims_session_leaves_its_output_exact(keyed, model_dir):
    """The victim streams a greedy generation; meanwhile a caller without the key sends steps
    on the victim's session id to both stages. Every one is refused, the output is the model's."""
    expected = reference_greedy(model_dir, VICTIM_PROMPT, 40)
    epoch = keyed.orchestrator.router.plan.epoch
    with user(keyed) as victim:
        pieces = victim.stream(
            token_ids=VICTIM_PROMPT, max_new_tokens=40, session_id="victim-1", speculate="off"
        )
        got = list(next(pieces).token_ids)
        for start in range(len(VICTIM_PROMPT) + 1):
            for address in keyed.addresses:
                step = pb.StepRequest(session_id="victim-1", plan_epoch=epoch, start_pos=start,
                                      token_ids=[3] * 24)  # fmt: skip
                err = refused(anonymous(address).Forward, step)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        got += [t for piece in pieces for t in piece.token_ids]
    assert got == expected


def test_a_fetch_weights_stage_takes_no_weights_from_a_caller_without_the_key(model_dir, tmp_path):
    server, port, stage = build_stage(
        StageConfig(
            model="", fetch_weights=True, weights_cache=str(tmp_path / "cache"), **stage_key()
        )
    )
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        config = (model_dir / "config.json").read_text()
        offer = pb.WeightManifest(model_fingerprint="attacker", config_json=config)
        err = refused(anonymous(address).OfferWeights, offer)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        chunks = iter([pb.WeightChunk(sha256="0" * 64, data=b"attacker's bytes")])
        err = refused(anonymous(address).PutWeights, chunks)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        assert stage.args is None and stage.fingerprint == ""  # it took no model from them
        # the key holder (the orchestrator) is let in
        owner = pb_grpc.StageStub(keyed_channel(address))
        assert owner.OfferWeights(offer, timeout=10).needs == []  # an empty manifest
        assert stage.args is not None
        assert owner.PutWeights(iter([]), timeout=10).bytes == 0
    finally:
        server.stop(0)
        stage.close()


def test_a_stage_dials_no_address_a_step_names(keyed):
    """A routed step naming an address outside the plan: a caller without the key is refused;
    nobody's step makes the stage open a connection there or hold a session for it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(2)
    foreign = f"127.0.0.1:{listener.getsockname()[1]}"
    first = keyed.addresses[0]
    epoch = keyed.orchestrator.router.plan.epoch
    sessions = keyed.stages[0].info()["active_sessions"]
    step = pb.StepRequest(session_id="stray", plan_epoch=epoch, token_ids=[1, 2], request_id=1,
                          route=[first, foreign], origin="attacker")  # fmt: skip
    try:
        err = refused(anonymous(first).ForwardStream, iter([pb.StepBatch(steps=[step])]))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        # with the key: the step is refused before it runs, naming the address
        owner = pb_grpc.StageStub(keyed_channel(first))
        (answer,) = owner.ForwardStream(iter([pb.StepBatch(steps=[step])]), timeout=10)
        (reply,) = answer.replies
        assert reply.error_code == grpc.StatusCode.PERMISSION_DENIED.value[0], reply
        assert repr(foreign) in reply.error_message and "not a stage of" in reply.error_message
        with pytest.raises(TimeoutError):
            listener.accept()  # no connection came
        assert keyed.stages[0].info()["active_sessions"] == sessions  # no stray session
    finally:
        listener.close()


def test_the_stage_key_lets_its_holder_in(keyed):
    """What the attacks sent, from the key holder: served (or refused for what they ask, never
    for who asks), and a retry of the plan's own assignment changes nothing."""
    first = keyed.addresses[0]
    owner = pb_grpc.StageStub(keyed_channel(first))
    plan = keyed.orchestrator.router.plan
    info = owner.Info(pb.InfoRequest(), timeout=10)
    assert (info.plan_epoch, info.layer_start) == (plan.epoch, 0)
    step = pb.StepRequest(session_id="owner", plan_epoch=plan.epoch, token_ids=[1, 2, 3])
    assert len(owner.Forward(step, timeout=10).hidden.shape) == 2
    assert owner.EndSession(pb.EndSessionRequest(session_id="owner"), timeout=10).freed_bytes > 0
    retry = pb.LoadLayersRequest(layer_start=info.layer_start, layer_end=info.layer_end,
                                 plan_epoch=plan.epoch, peer_addresses=keyed.addresses)  # fmt: skip
    assert owner.LoadLayers(retry, timeout=60).plan_epoch == plan.epoch
    # the same epoch with other peers is not the plan's assignment: refused as a stray message
    del retry.peer_addresses[1:]
    err = refused(owner.LoadLayers, retry)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    err = refused(owner.OfferWeights, pb.WeightManifest())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # no --fetch-weights: past the key


def test_an_orchestrator_without_the_stage_key_is_told_what_to_send(keyed, model_dir):
    config = OrchestratorConfig(
        model=str(model_dir), port=0, stages=tuple(keyed.addresses), stage_wait_s=5
    )
    server, _, orch = build_orchestrator(config)
    try:
        started = time.monotonic()
        orch.start()
        ready, detail = orch.ready()
        assert not ready
        assert "stage key" in detail and "x-llamadist-stage-key" in detail, detail
        assert time.monotonic() - started < 5  # told at once, not after --stage-wait-s
    finally:
        server.stop(0)
        orch.close()


# ---------------------------------------------------------------------- a stage's credential


def test_a_stage_without_a_credential_refuses_to_start(model_dir, capsys, monkeypatch):
    for name in STAGE_KEY_ENV:  # conftest gives every test's stage the key this way
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as err:
        build_stage(StageConfig(model=str(model_dir)))
    message = str(err.value)
    for flag in ("--stage-key-file", "--tls-cert", "--insecure-open-stage"):
        assert flag in message
    assert main(["stage", "--model", str(model_dir), "--port", "0"]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.count("\n") == 0 and "--stage-key-file" in printed, printed


@pytest.mark.parametrize(
    "text, needle",
    [("", "at least 16"), ("short\n", "at least 16"), ("two words here!!", "one word")],
)
def test_a_bad_stage_key_file_is_refused(model_dir, tmp_path, text, needle):
    key = tmp_path / "stage-key"
    key.write_text(text)
    for make in (
        lambda: StageConfig(model=str(model_dir), key_file=str(key)),
        lambda: OrchestratorConfig(model=str(model_dir), stages=("a:1",), stage_key_file=str(key)),
    ):
        with pytest.raises(ConfigError, match=needle) as err:
            make()
        assert "--stage-key-file" in str(err.value) and str(key) in str(err.value)
    with pytest.raises(ConfigError, match="one or the other"):
        StageConfig(model=str(model_dir), key_file=stage_key_file(), insecure_open_stage=True)


def test_an_open_stage_warns_that_anyone_may_change_it(model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="stage_service.server"):
        server, port, stage = build_stage(StageConfig(model=str(model_dir),
                                                      insecure_open_stage=True))  # fmt: skip
    server.start()
    try:
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "anyone who can reach" in warning.getMessage()
        assert f"127.0.0.1:{port}" in warning.getMessage()
        assert anonymous(f"127.0.0.1:{port}").Info(pb.InfoRequest(), timeout=10).num_layers == 4
    finally:
        server.stop(0)
        stage.close()


def test_the_launcher_gives_its_stages_a_key_of_their_own(model_dir, tmp_path, monkeypatch):
    """`llamadist up` without --secure: the stages and the orchestrator share a stage key made
    in the log directory; a caller without it is refused."""
    for name in STAGE_KEY_ENV:  # not the tests' key: the launcher's own
        monkeypatch.delenv(name)
    with LocalMesh(str(model_dir), 2, threads=1, log_dir=tmp_path) as mesh:
        key = tmp_path / "stage-key"
        assert mesh.stage_key_file == str(key) and stat.S_IMODE(key.stat().st_mode) == 0o600
        stage = next(p.address for p in mesh.processes if p.name == "stage0")
        err = refused(anonymous(stage).Info, pb.InfoRequest())
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        with Client(mesh.address, 60) as c:
            out = c.generate(token_ids=VICTIM_PROMPT, max_new_tokens=4)
        assert out.token_ids == reference_greedy(model_dir, VICTIM_PROMPT, 4)


def test_a_call_on_a_closed_keyed_channel_raises_and_does_not_crash():
    """A generation that ends its session while its orchestrator closes calls a stage on a
    closed channel. Through grpc.intercept_channel that crashed the process (SIGSEGV, seen in
    `make test`); a keyed channel must raise ValueError as a plain one does. In a subprocess,
    so that a crash fails this test instead of ending the run."""
    code = (
        "from protos import llamadist_pb2 as pb, llamadist_pb2_grpc as pb_grpc\n"
        "from protos.shared.stage_auth import stage_channel\n"
        "channel = stage_channel('127.0.0.1:9', key='k' * 16)\n"
        "stub = pb_grpc.StageStub(channel)\n"
        "channel.close()\n"
        "try:\n"
        "    stub.Info(pb.InfoRequest(), timeout=1)\n"
        "except ValueError as err:\n"
        "    print('refused:', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])
    assert "refused: Cannot invoke RPC on closed channel" in done.stdout
