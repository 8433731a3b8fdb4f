"""The containers end to end: docker/docker-compose.yml on this host with docker-compose, and the
same file as a swarm stack on a one-node swarm. From the host, through the published port, a greedy
generation must equal the loopback mesh's. `make compose-test` builds the image and runs these;
everything they start is removed at the end, also after a failure. Docker networks stay inside
198.18.0.0/15 (the range reserved for network tests)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from client import Client, ClientError
from client.launcher import LocalMesh
from tests.conftest import require_or_skip
from tests.netns import LLAMADIST

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
IMAGE = os.environ.get("LLAMADIST_IMAGE", "llamadist:latest")
COMPOSE_SUBNET = "198.19.200.0/24"
SWARM_ADDRESS = "198.18.254.1"  # the one node's address, on a veth of its own
SWARM_POOL = "198.19.128.0/18"
GWBRIDGE_SUBNET = "198.19.250.0/24"
PROMPT = "Once upon a time"
NEW_TOKENS = 24

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("LLAMADIST_COMPOSE_TEST") != "1",
        reason="deployment test: `make compose-test` runs it (builds the image, needs dockerd)",
    ),
]


def sh(*argv: str, env: dict | None = None, timeout_s: float = 300, stdin: str | None = None):
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout_s, env=env, input=stdin
    )


def docker_reason() -> str | None:
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    info = sh("docker", "info", "--format", "{{.ServerVersion}}")
    if info.returncode != 0:
        return f"dockerd does not answer: {info.stderr.strip()}"
    if sh("docker", "image", "inspect", IMAGE).returncode != 0:
        return f"no image {IMAGE}: run `make images`"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout_s: float, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(poll_s)


def inspect(container: str) -> dict:
    out = sh("docker", "inspect", container)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


@pytest.fixture(scope="module")
def reference(default_model) -> list[int]:
    """The same greedy generation on a loopback mesh (what `llamadist up` runs)."""
    with (
        LocalMesh(str(default_model), num_stages=2, threads=1) as mesh,
        Client(mesh.address, timeout_s=120) as client,
    ):
        return client.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids


def deployment_env(model: Path, port: int, http_port: int = 0) -> dict:
    return {
        **os.environ,
        "LLAMADIST_HTTP_PORT": str(http_port or free_port()),
        "LLAMADIST_MODEL_DIR": str(model),
        "LLAMADIST_IMAGE": IMAGE,
        "LLAMADIST_PORT": str(port),
        "LLAMADIST_STEP_TIMEOUT_S": "5",
    }


def generate_and_plan(address: str, reference: list[int], label: str) -> None:
    with Client(address, timeout_s=120) as client:
        client.wait_ready(240)
        result = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert result.token_ids == reference
    print(f"\n{label}: generation through {address} equals the loopback mesh's: {result.text!r}")
    print(f"{label}: timings {result.timings}")
    plan = sh(LLAMADIST, "plan", "show", "--server", address)
    assert plan.returncode == 0, plan.stderr
    assert "stage0:7000" in plan.stdout and "stage1:7000" in plan.stdout
    print(plan.stdout.rstrip())


def chat_through_http(url: str, grpc_port: int) -> None:
    """One chat completion through the published HTTP API (the openai SDK), greedy: the same
    text as the gRPC Generate of the same chat."""
    from openai import OpenAI

    chat = [{"role": "user", "content": PROMPT}]
    reply = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    served = reply.models.list().data[0].id  # the model directory's name in the container
    answer = reply.chat.completions.create(
        model=served, messages=chat, temperature=0, max_tokens=NEW_TOKENS
    )
    with Client(f"127.0.0.1:{grpc_port}", timeout_s=120) as client:
        expected = client.generate(messages=chat, max_new_tokens=NEW_TOKENS)
    assert answer.choices[0].message.content == expected.text
    print(f"compose: chat completion through {url}: {expected.text!r}")


def assert_holds_only_its_range(container: str, model: Path) -> None:
    """A stage container holds no safetensors file and fewer weight bytes than the model."""
    found = sh("docker", "exec", container, "sh", "-c",
               "find / -xdev -name '*.safetensors' 2>/dev/null; true")  # fmt: skip
    assert found.stdout.strip() == "", found.stdout
    du = sh("docker", "exec", container, "du", "-sb", "/cache/blobs")
    assert du.returncode == 0, du.stderr
    held = int(du.stdout.split()[0])
    full = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    assert 0 < held < full, (held, full)
    print(f"compose: {container[:12]} holds {held / 1e6:.0f} MB of the {full / 1e6:.0f} MB model")


def test_compose_deployment(default_model, reference, tmp_path):
    reason = docker_reason()
    if reason:
        require_or_skip("compose", f"compose test: {reason}")
    project = f"llamadist-test-{os.getpid()}"
    port = free_port()
    network = tmp_path / "network.yml"
    network.write_text(
        'version: "3.8"\nnetworks:\n  default:\n    ipam:\n'
        f"      config:\n        - subnet: {COMPOSE_SUBNET}\n"
    )
    http_port = free_port()
    env = deployment_env(default_model, port, http_port)
    compose = ["docker-compose", "-p", project, "-f", str(COMPOSE_FILE), "-f", str(network)]
    began = time.monotonic()
    try:
        up = sh(*compose, "up", "-d", env=env)
        assert up.returncode == 0, up.stderr
        print(f"\ncompose: up in {time.monotonic() - began:.0f} s")
        ids = {}
        for service in ("orchestrator", "stage0", "stage1"):
            ps = sh(*compose, "ps", "-q", service, env=env)
            ids[service] = ps.stdout.strip()
            assert ps.returncode == 0 and ids[service], ps.stderr

        generate_and_plan(f"127.0.0.1:{port}", reference, "compose")
        chat_through_http(f"http://127.0.0.1:{http_port}/v1", port)

        for service, container in ids.items():
            c = inspect(container)
            assert c["Config"]["Hostname"] == service
            assert c["Config"]["User"] == "llamadist"
            uid = sh("docker", "exec", container, "id", "-u")
            assert uid.stdout.strip() == "10001", uid.stderr
            mounts = [(m["Destination"], m["RW"]) for m in c["Mounts"]]
            # the model is the orchestrator's only; a stage has its weights cache; each reads
            # the stage key the stage-key service made
            own = [("/model", False)] if service == "orchestrator" else [("/cache", True)]
            assert sorted(mounts) == sorted([*own, ("/run/secrets", False)])
            if service != "orchestrator":
                assert_holds_only_its_range(container, default_model)
            published = {k: v for k, v in (c["HostConfig"]["PortBindings"] or {}).items() if v}
            expected = {
                "50051/tcp": [{"HostIp": "", "HostPort": str(port)}],
                "8080/tcp": [{"HostIp": "", "HostPort": str(http_port)}],
            }
            assert published == (expected if service == "orchestrator" else {})
            ip = next(iter(c["NetworkSettings"]["Networks"].values()))["IPAddress"]
            assert ipaddress.ip_address(ip) in ipaddress.ip_network(COMPOSE_SUBNET)

        def all_healthy() -> bool:
            return all(inspect(c)["State"]["Health"]["Status"] == "healthy" for c in ids.values())

        wait_for("every container healthy (HEALTHCHECK)", all_healthy, 120)
        print("compose: containers healthy, non-root, model read-only, gRPC and HTTP published")

        stop = sh(*compose, "stop", "-t", "15", "stage1", env=env)
        assert stop.returncode == 0, stop.stderr
        with (
            Client(f"127.0.0.1:{port}", timeout_s=120) as client,
            pytest.raises(ClientError) as err,
        ):
            client.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
        assert err.value.code == "UNAVAILABLE" and "stage 1 (stage1:7000)" in err.value.message
        print(f"compose: stage1 stopped: {err.value}")
        # started again, it rejoins from its weights cache: nothing travels
        start = sh(*compose, "start", "stage1", env=env)
        assert start.returncode == 0, start.stderr
        with Client(f"127.0.0.1:{port}", timeout_s=60) as client:

            def sources() -> dict:
                return {
                    s["address"]: s.get("info", {}).get("weights_source", "")
                    for s in client.stages()
                }

            wait_for("stage1 rejoined", lambda: sources()["stage1:7000"] != "", 180)
            assert sources() == {"stage0:7000": "wire", "stage1:7000": "cache"}, sources()
        generate_and_plan(f"127.0.0.1:{port}", reference, "compose, stage1 restarted")
    finally:
        logs = sh(*compose, "logs", "--no-color", "--tail", "30", env=env)
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
        down = sh(*compose, "down", "-v", "--remove-orphans", "-t", "20", env=env)
    assert down.returncode == 0, down.stderr
    left = sh("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}")
    assert left.stdout.strip() == ""
    assert sh("docker", "network", "inspect", f"{project}_default").returncode != 0
    print(f"compose: done in {time.monotonic() - began:.0f} s, everything removed")


def swarm_reason() -> str | None:
    state = sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    if state != "inactive":
        return f"this dockerd's swarm state is {state!r}: not touching a swarm we did not make"
    if sh("docker", "network", "inspect", "docker_gwbridge").returncode == 0:
        return "docker_gwbridge exists already: not touching a network we did not make"
    return None


def remove_swarm(made: list[str], stack: str, veth: str) -> None:
    """Undoes what test_swarm_stack made, newest first; every step runs even if one fails."""
    label = f"label=com.docker.stack.namespace={stack}"
    steps = {
        "stack": lambda: (
            sh("docker", "stack", "rm", stack),
            wait_for(
                f"the containers of stack {stack} removed",
                lambda: sh("docker", "ps", "-aq", "--filter", label).stdout.strip() == "",
                120,
            ),
        ),
        "volumes": lambda: [
            sh("docker", "volume", "rm", v)
            for v in sh("docker", "volume", "ls", "-q", "--filter", label).stdout.split()
        ],
        "swarm": lambda: sh("docker", "swarm", "leave", "--force"),
        "gwbridge": lambda: sh("docker", "network", "rm", "docker_gwbridge"),
        "veth": lambda: sh("ip", "link", "del", veth + "a"),
    }
    failures = []
    for name in ("stack", "volumes", "swarm", "gwbridge", "veth"):
        if name in made or (name == "volumes" and "stack" in made):
            try:
                steps[name]()
            except Exception as err:  # report it, then go on removing
                failures.append(f"{name}: {err}")
    assert not failures, failures


def test_swarm_stack(default_model, reference, tmp_path):
    reason = docker_reason() or swarm_reason()
    if reason:
        pytest.skip(f"swarm test: {reason}")
    stack = f"llamadist-test-{os.getpid()}"
    veth = f"llx{os.getpid()}"
    port = free_port()
    env = deployment_env(default_model, port)
    began = time.monotonic()
    made: list[str] = []
    try:
        # The node's address: a veth of its own in 198.18.0.0/15 (swarm refuses loopback).
        for argv in (
            ["ip", "link", "add", veth + "a", "type", "veth", "peer", "name", veth + "b"],
            ["ip", "addr", "add", f"{SWARM_ADDRESS}/32", "dev", veth + "a"],
            ["ip", "link", "set", veth + "a", "up"],
            ["ip", "link", "set", veth + "b", "up"],
        ):
            out = sh(*argv)
            if out.returncode != 0:
                pytest.skip(f"swarm test: cannot give the node an address: {out.stderr.strip()}")
            if "veth" not in made:
                made.append("veth")
        # Made by us, in the test range, before swarm makes it in its default range.
        gwbridge = sh(
            "docker", "network", "create", "--subnet", GWBRIDGE_SUBNET,
            "--opt", "com.docker.network.bridge.name=docker_gwbridge",
            "--opt", "com.docker.network.bridge.enable_icc=false",
            "--opt", "com.docker.network.bridge.enable_ip_masquerade=true", "docker_gwbridge",
        )  # fmt: skip
        assert gwbridge.returncode == 0, gwbridge.stderr
        made.append("gwbridge")
        init = sh(
            "docker", "swarm", "init", "--advertise-addr", SWARM_ADDRESS,
            "--listen-addr", f"{SWARM_ADDRESS}:2377", "--default-addr-pool", SWARM_POOL,
            "--default-addr-pool-mask-length", "24",
        )  # fmt: skip
        if init.returncode != 0:
            pytest.skip(f"swarm test: this dockerd refuses swarm mode: {init.stderr.strip()}")
        made.append("swarm")
        node = sh("docker", "info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
        labels = ["llamadist.orchestrator", "llamadist.stage0", "llamadist.stage1"]
        label_args = [a for label in labels for a in ("--label-add", f"{label}=true")]
        labelled = sh("docker", "node", "update", *label_args, node)
        assert labelled.returncode == 0, labelled.stderr

        key_env = {**os.environ, "LLAMADIST_STAGE_KEY_FILE": str(tmp_path / "stage-key")}
        stack_file = sh(str(ROOT / "docker" / "stack-file.sh"), env=key_env)
        assert stack_file.returncode == 0, stack_file.stderr
        deploy = sh("docker", "stack", "deploy", "-c", "-", stack, env=env, stdin=stack_file.stdout)
        assert deploy.returncode == 0, deploy.stderr
        made.append("stack")

        generate_and_plan(f"127.0.0.1:{port}", reference, "swarm")

        def tasks_running() -> str | None:
            # A task is "Starting" until its HEALTHCHECK passes, then "Running".
            out = sh("docker", "stack", "ps", stack, "--format", "{{.Name}} {{.CurrentState}}")
            rows = [line.split() for line in out.stdout.splitlines()]
            running = sorted(r[0].split(".")[0] for r in rows if r[1] == "Running")
            expected = sorted(f"{stack}_{s}" for s in ("orchestrator", "stage0", "stage1"))
            return out.stdout.strip() if running == expected and len(rows) == 3 else None

        tasks = wait_for("every task of the stack running and healthy", tasks_running, 120)
        for service in ("stage0", "stage1"):
            spec = json.loads(sh("docker", "service", "inspect", f"{stack}_{service}").stdout)[0]
            constraints = spec["Spec"]["TaskTemplate"]["Placement"]["Constraints"]
            assert constraints == [f"node.labels.llamadist.{service} == true"]
        print(f"swarm: {tasks}")
    finally:
        remove_swarm(made, stack, veth)
    assert (
        sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "inactive"
    )
    assert sh("docker", "network", "inspect", "docker_gwbridge").returncode != 0
    assert sh("ip", "link", "show", veth + "a").returncode != 0
    print(f"swarm: done in {time.monotonic() - began:.0f} s, everything removed")
