"""TLS, mutual TLS between orchestrator and stages, and API keys with client/admin roles: real
gRPC servers on loopback port 0 with certificates from `client.certs`."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from client.cli import main
from client.client import Client, ClientError, stage_health
from orchestrator.config import OrchestratorConfig
from orchestrator.stage_client import StageClient
from protos import llamadist_pb2 as pb
from protos.errors import Unavailable
from protos.shared import security
from stage_service.config import StageConfig
from tests.conftest import (
    make_tiny_model,
    reference_greedy,
)
from tests.secure_mesh import ADMIN_KEY, CLIENT_KEY, SecureMesh, tls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("secure"), "gqa")


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
