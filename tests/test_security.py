"""TLS, mutual TLS between orchestrator and stages, and API keys with client/admin roles: real
gRPC servers on loopback port 0 with certificates from `client.certs`."""

from __future__ import annotations

import json
import logging
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from google.protobuf import message

from client.certs import make_certs
from client.cli import main
from client.client import Client, ClientError, stage_health
from client.launcher import LocalMesh
from orchestrator.config import OrchestratorConfig
from orchestrator.server import build_server as build_orchestrator
from orchestrator.stage_client import StageClient
from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.errors import Unavailable
from protos.shared import security
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

CLIENT_KEY = "client-key-0123456789abcdef"
ADMIN_KEY = "admin-key-fedcba9876543210"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """Two unrelated development CAs: `good` (the mesh's) and `rogue`."""
    root = tmp_path_factory.mktemp("pki")
    keys = root / "api-keys"
    keys.write_text(
        f"# the test mesh's keys\n{CLIENT_KEY} client\n\n{ADMIN_KEY}   admin  # all RPCs\n"
    )
    return SimpleNamespace(
        good=make_certs(root / "good"), rogue=make_certs(root / "rogue"), keys=str(keys)
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("secure"), "gqa")


def tls(paths: dict[str, Path], ca: dict[str, Path] | None = None) -> dict[str, str]:
    """Service TLS settings: the server certificate of `paths`, trusting `ca` (default: same)."""
    return dict(
        tls_cert=str(paths["server.pem"]),
        tls_key=str(paths["server-key.pem"]),
        tls_ca=str((ca or paths)["ca.pem"]),
    )


class SecureMesh:
    """Stages and an orchestrator in this process, each with its own TLS settings."""

    def __init__(self, model_dir: Path, stage_tls: list[dict], orch_tls: dict, **orch_kwargs):
        self.servers = []
        self.addresses = []
        for settings in stage_tls:
            server, port, _ = build_stage(
                StageConfig(model=str(model_dir), kv_cache_mb=64, **settings)
            )
            server.start()
            self.servers.append(server)
            self.addresses.append(f"127.0.0.1:{port}")
        config = OrchestratorConfig(
            model=str(model_dir),
            port=0,
            stages=tuple(self.addresses),
            stage_wait_s=orch_kwargs.pop("stage_wait_s", 10),
            **orch_tls,
            **orch_kwargs,
        )
        server, port, self.orchestrator = build_orchestrator(config)
        server.start()
        self.servers.append(server)
        self.orchestrator.start()
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.orchestrator.close()
        for server in self.servers:
            server.stop(0)


@pytest.fixture(scope="module")
def mesh(model_dir, pki):
    """mTLS on the stage links, TLS and API keys toward clients."""
    m = SecureMesh(
        model_dir, [tls(pki.good)] * 2, tls(pki.good), api_keys_file=pki.keys, stage_wait_s=30
    )
    yield m
    m.stop()


def client(mesh: SecureMesh, pki, key: str | None, **kwargs) -> Client:
    return Client(mesh.address, 30, tls_ca=pki.good["ca.pem"], api_key=key, **kwargs)


# ---------------------------------------------------------------------- mutual TLS


def test_mtls_mesh_generates_exactly(mesh, pki, model_dir):
    with client(mesh, pki, CLIENT_KEY) as c:
        assert c.health() == (True, "")
        out = c.generate(token_ids=[5, 6, 7], max_new_tokens=6)
        pieces = list(c.stream(token_ids=[5, 6, 7], max_new_tokens=6))
        stages = c.stages()
    streamed = [t for piece in pieces for t in piece.token_ids]
    assert out.token_ids == reference_greedy(model_dir, [5, 6, 7], 6) == streamed
    assert [s["reachable"] for s in stages] == [True, True]


def test_stage_refuses_callers_without_a_certificate_of_its_ca(mesh, pki):
    address = mesh.addresses[0]
    good = security.channel_credentials(
        str(pki.good["ca.pem"]), str(pki.good["server.pem"]), str(pki.good["server-key.pem"])
    )
    callers = {
        "plaintext": None,
        "no client certificate": security.channel_credentials(str(pki.good["ca.pem"])),
        "certificate of another CA": security.channel_credentials(
            str(pki.good["ca.pem"]),  # trusts the stage, but presents a rogue certificate
            str(pki.rogue["server.pem"]),
            str(pki.rogue["server-key.pem"]),
        ),
    }
    for creds in callers.values():
        stage = StageClient(address, 0, channel_credentials=creds)
        try:
            with pytest.raises(Unavailable, match=re.escape(address)):
                stage.drop_layers(99)  # an admin RPC: it must never run
        finally:
            stage.close()
    stage = StageClient(address, 0, channel_credentials=good)
    try:
        info = stage.info()  # the CA's certificate is let in; the plan is untouched
        assert info.layer_end > info.layer_start and info.plan_epoch not in (0, 99)
    finally:
        stage.close()
    # `llamadist health --stage` with the client certificate of the CA
    ok, _ = stage_health(
        address,
        tls_ca=pki.good["ca.pem"],
        tls_cert=pki.good["client.pem"],
        tls_key=pki.good["client-key.pem"],
    )
    assert ok
    with pytest.raises(ClientError) as err:
        stage_health(address, tls_ca=pki.good["ca.pem"])
    assert err.value.code == "UNAVAILABLE"


@pytest.mark.parametrize(
    "stage_side",
    ["stage certificate of another CA", "stage trusts another CA"],
)
def test_a_stage_outside_the_ca_cannot_join(model_dir, pki, stage_side):
    if stage_side == "stage certificate of another CA":
        stage_tls = tls(pki.rogue, ca=pki.good)  # the orchestrator cannot verify the stage
    else:
        stage_tls = tls(pki.good, ca=pki.rogue)  # the stage refuses the orchestrator
    m = SecureMesh(model_dir, [tls(pki.good), stage_tls], tls(pki.good), stage_wait_s=1)
    try:
        with Client(m.address, 10, tls_ca=pki.good["ca.pem"]) as c:
            ok, detail = c.health()
            assert not ok
            assert f"stage 1 ({m.addresses[1]})" in detail and "start-up failed" in detail
            with pytest.raises(ClientError) as err:
                c.generate(token_ids=[1, 2], max_new_tokens=2)
            assert err.value.code == "UNAVAILABLE"
    finally:
        m.stop()


def test_partial_tls_settings_are_refused(pki, model_dir):
    with pytest.raises(ValueError, match="go together"):
        StageConfig(model=str(model_dir), tls_cert=str(pki.good["server.pem"]))
    with pytest.raises(ValueError, match="go together"):
        OrchestratorConfig(model=str(model_dir), stages=("a:1",), tls_ca=str(pki.good["ca.pem"]))


# ---------------------------------------------------------------------- TLS toward clients


def test_plaintext_or_untrusting_clients_cannot_talk_to_a_tls_orchestrator(mesh, pki):
    for kwargs in ({}, {"tls_ca": pki.rogue["ca.pem"]}):
        with Client(mesh.address, 10, api_key=CLIENT_KEY, **kwargs) as c:
            with pytest.raises(ClientError) as err:
                c.health()
            assert err.value.code == "UNAVAILABLE"


# ---------------------------------------------------------------------- API keys and roles


@pytest.mark.parametrize("key", [None, "not-a-key", CLIENT_KEY + "x", CLIENT_KEY[:-1]])
def test_missing_or_wrong_key_is_unauthenticated(mesh, pki, key):
    with client(mesh, pki, key) as c:
        for call in (
            lambda: c.generate(token_ids=[1, 2], max_new_tokens=2),
            lambda: list(c.stream(token_ids=[1, 2], max_new_tokens=2)),
            c.plan,
            lambda: c.reload_plan(strategy="uniform"),
        ):
            with pytest.raises(ClientError) as err:
                call()
            assert err.value.code == "UNAUTHENTICATED" and "API key" in err.value.message
        assert c.health() == (True, "")  # health checks need no key


def test_key_with_another_scheme_is_unauthenticated(mesh, pki):
    with client(mesh, pki, None) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.stub.GetPlan(pb.GetPlanRequest(), metadata=[("authorization", f"Basic {CLIENT_KEY}")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_key_is_denied_admin_rpcs(mesh, pki):
    with client(mesh, pki, CLIENT_KEY) as c:
        epoch = int(c.plan()["epoch"])
        assert len(c.stages()) == 2
        for call in (c.preview_plan, c.reload_plan):
            with pytest.raises(ClientError) as err:
                call(strategy="uniform")
            assert err.value.code == "PERMISSION_DENIED" and "admin" in err.value.message
        assert int(c.plan()["epoch"]) == epoch  # nothing changed


def test_admin_key_may_do_everything(mesh, pki, model_dir):
    with client(mesh, pki, ADMIN_KEY) as c:
        epoch = int(c.plan()["epoch"])
        assert (
            c.preview_plan(strategy="custom", boundaries="0-0,1-3")["stages"][0]["layer_end"] == 1
        )
        plan = c.reload_plan(strategy="custom", boundaries="0-0,1-3")
        assert int(plan["epoch"]) == epoch + 1
        assert c.generate(token_ids=[5, 6, 7], max_new_tokens=4).token_ids == reference_greedy(
            model_dir, [5, 6, 7], 4
        )


def test_every_orchestrator_rpc_has_a_role():
    from protos.shared.standard_services import HEALTH_METHODS, REFLECTION_METHOD

    methods = (
        {
            security.ORCHESTRATOR + m.name
            for m in pb.DESCRIPTOR.services_by_name["Orchestrator"].methods
        }
        | HEALTH_METHODS
        | {REFLECTION_METHOD}
    )  # the standard services: probes open, grpcurl a client
    admin_only = methods - security.OPEN_METHODS - security.CLIENT_METHODS
    assert methods >= security.OPEN_METHODS | security.CLIENT_METHODS
    assert {m.rsplit("/", 1)[1] for m in admin_only} == {"PreviewPlan", "ReloadPlan"}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "no keys"),
        ("# only a comment\n", "no keys"),
        ("sekrit-key root\n", "line 1"),
        ("sekrit-key\n", "line 1"),
        ("k1 client\nsekrit-key admin\nsekrit-key client\n", "line 3: the key is listed twice"),
    ],
)
def test_bad_api_keys_files_are_refused_without_showing_keys(text, needle):
    with pytest.raises(ValueError, match=needle) as err:
        security.parse_api_keys(text)
    assert "sekrit" not in str(err.value)


def test_api_keys_file_format():
    text = "# keys\n  a1 client  # alice\nb2\tadmin\n\n"
    assert security.parse_api_keys(text) == [("a1", "client"), ("b2", "admin")]


# ---------------------------------------------------------------------- command line


def test_certs_command_writes_a_ca_and_certificates(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--hosts", "198.18.0.2,stage0", "--api-keys"]) == 0
    names = {Path(line).name for line in capsys.readouterr().out.split()}
    assert names == {
        "ca.pem",
        "ca-key.pem",
        "server.pem",
        "server-key.pem",
        "client.pem",
        "client-key.pem",
        "api-keys",
    }
    for key in ("ca-key.pem", "server-key.pem", "client-key.pem", "api-keys", "api-keys.admin"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "::1",
        "198.18.0.2",
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "stage0"}
    roles = dict(reversed(pair) for pair in security.parse_api_keys((out / "api-keys").read_text()))
    assert (out / "api-keys.admin").read_text().strip() == roles["admin"]
    # never overwrites a CA by accident
    assert main(["certs", "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()) == ca


def test_cli_client_commands_with_keys_and_ca(mesh, pki, capsys, monkeypatch):
    secure = ["--server", mesh.address, "--tls-ca", str(pki.good["ca.pem"])]
    assert main(["plan", "show", "--json", *secure, "--api-key", CLIENT_KEY]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["address"] for s in plan["stages"]] == mesh.addresses

    assert main(["plan", "reload", "--strategy", "uniform", *secure, "--api-key", CLIENT_KEY]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and err.count("\n") == 1 and CLIENT_KEY not in err

    assert main(["plan", "show", *secure, "--api-key", "wrong"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["plan", "show", "--server", mesh.address, "--api-key", CLIENT_KEY]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err  # plaintext against TLS
    assert main(["health", *secure]) == 0  # no key needed
    assert capsys.readouterr().out.strip() == "SERVING"

    monkeypatch.setenv("LLAMADIST_API_KEY", ADMIN_KEY)  # the environment fallbacks
    monkeypatch.setenv("LLAMADIST_TLS_CA", str(pki.good["ca.pem"]))
    assert (
        main(["plan", "preview", "--strategy", "uniform", "--json", "--server", mesh.address]) == 0
    )
    assert len(json.loads(capsys.readouterr().out)["stages"]) == 2


@pytest.mark.slow
def test_up_secure_serves_generate_with_key_and_ca(default_model, tmp_path):
    llamadist = str(Path(sys.executable).parent / "llamadist")
    up = subprocess.Popen(
        [
            llamadist,
            "up",
            "--secure",
            "--stages",
            "2",
            "--port",
            "0",
            "--model",
            str(default_model),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, f"llamadist up --secure exited before it was ready: {lines}"
            lines.append(line)
            if "mesh ready" in line:
                break
        text = "".join(lines)
        address = re.search(r"listening on (\S+:\d+)", text).group(1)
        ca = re.search(r"--tls-ca (\S+)", text).group(1)
        keys_file = re.search(r"API keys file: (\S+)", text).group(1)
        client_key = Path(keys_file + ".client").read_text().strip()
        admin_key = Path(keys_file + ".admin").read_text().strip()
        assert client_key not in text and admin_key not in text  # keys are never printed

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [llamadist, *args], capture_output=True, text=True, timeout=120, check=False
            )

        gen = ["generate", "--server", address, "--tls-ca", ca, "--json"]
        gen += ["--max-new-tokens", "8", "--ignore-eos", "The capital of France is"]
        out = run(*gen, "--api-key", client_key)
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["token_ids"]) == 8
        assert "UNAUTHENTICATED" in run(*gen).stderr
        reload = ["plan", "reload", "--strategy", "uniform", "--server", address, "--tls-ca", ca]
        assert "PERMISSION_DENIED" in run(*reload, "--api-key", client_key).stderr
        assert run(*reload, "--api-key", admin_key).returncode == 0
        assert "UNAVAILABLE" in run("health", "--server", address).stderr  # plaintext refused
    finally:
        up.send_signal(2)
        up.wait(60)


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
    held = [(s.epoch, s.loaded.model.weights.start) for s in keyed.stages]
    for address in keyed.addresses:
        for name, (method, request) in attacks(keyed, "victim").items():
            err = refused(getattr(anonymous(address), method), request)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.code(), err.details())
            assert "stage key" in err.details() and "x-llamadist-stage-key" in err.details()
        health = anonymous(address).Health(pb.HealthRequest(), timeout=10)  # stays open
        assert health.status == pb.HealthReply.SERVING
    assert [(s.epoch, s.loaded.model.weights.start) for s in keyed.stages] == held
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
