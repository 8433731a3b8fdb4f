"""Multi-host without a cloud: the orchestrator and each stage on a host of their own (a network
namespace, tests/netns.py), linked through a bridge with a delay on every link. A generation must
equal the loopback mesh's; a stage whose link is cut must be named in the error."""

from __future__ import annotations

import json
import sys
import time
import warnings

import pytest

from client import Client
from client.launcher import LocalMesh
from tests import netns

pytestmark = pytest.mark.slow

PROMPT = "The three largest cities of Europe are"
NEW_TOKENS = 16
STAGE_PORT = 7000
ORCHESTRATOR_PORT = 50051
HOSTS = ["orchestrator", "stage0", "stage1"]


def test_mesh_across_namespaces(default_model, tmp_path):
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"netns multi-host test: {reason}")
    began = time.monotonic()
    model = str(default_model)

    with LocalMesh(model, num_stages=2, threads=1) as mesh, Client(mesh.address, 120) as client:
        expected = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    assert len(expected) == NEW_TOKENS

    with netns.NetnsLab(HOSTS, log_dir=tmp_path) as lab:
        if lab.delay_note:
            warnings.warn(lab.delay_note, stacklevel=1)
            print(f"\nnetns: {lab.delay_note}")
        else:
            assert all(lab.delay_active(h) for h in HOSTS)
            print(f"\nnetns: {lab.delay_ms} ms netem delay on every link")
        stage_hosts = [h for h in HOSTS if h.startswith("stage")]
        stages = [
            lab.spawn(h, ["stage", "--model", model, "--host", lab.hosts[h].address,
                          "--port", str(STAGE_PORT), "--threads", "1"])
            for h in stage_hosts
        ]  # fmt: skip
        addresses = [p.wait_address(120) for p in stages]
        assert addresses == [f"{lab.hosts[h].address}:{STAGE_PORT}" for h in stage_hosts]
        orchestrator = lab.spawn(
            "orchestrator",
            ["orchestrator", "--model", model, "--stages", ",".join(addresses),
             "--host", lab.hosts["orchestrator"].address, "--port", str(ORCHESTRATOR_PORT),
             "--stage-wait-s", "120"],
        )  # fmt: skip
        server = orchestrator.wait_address(120)
        # Poll Health from inside the orchestrator's namespace until it serves.
        ready = lab.run(
            "orchestrator",
            [
                sys.executable,
                "-c",
                f"from client import Client; Client({server!r}).wait_ready(180)",
            ],
        )
        assert ready.returncode == 0, ready.stderr

        generate = [netns.LLAMADIST, "generate", "--server", server, "--json",
                    "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos", PROMPT]  # fmt: skip
        out = lab.run("orchestrator", generate)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["token_ids"] == expected
        print(f"netns: generation equals loopback's: {result['text']!r}")
        print(f"netns: timings {result['timings']}")

        plan = lab.run("orchestrator", [netns.LLAMADIST, "plan", "show", "--server", server])
        assert plan.returncode == 0, plan.stderr
        assert all(a in plan.stdout for a in addresses)
        print(plan.stdout.rstrip())

        lab.cut("stage1")
        cut_at = time.monotonic()
        out = lab.run("orchestrator", generate, timeout_s=60)
        waited = time.monotonic() - cut_at
        assert out.returncode == 1
        assert "UNAVAILABLE" in out.stderr and f"stage 1 ({addresses[1]})" in out.stderr
        assert "Traceback" not in out.stderr
        # Keepalive pings find the dead link long before the 60 s step deadline.
        assert waited < 5, waited
        print(f"netns: stage1's link cut, after {waited:.1f} s: {out.stderr.strip()}")

    assert lab.leftovers() == []
    print(f"netns: done in {time.monotonic() - began:.0f} s, nothing left behind")
