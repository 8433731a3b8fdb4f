"""Stage-to-stage forwarding seen from the orchestrator: every step is one message in and one
answer out, the answer holds no hidden state and every stage's compute time, and the greedy
output is transformers' own."""

from __future__ import annotations

import pytest

from tests.conftest import in_process_mesh, make_tiny_model, reference_greedy

PROMPT = [7, 3, 99, 12, 45, 60, 2, 81]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("forwarding"), "untied_mha")  # 6 layers


def test_the_orchestrator_sends_one_message_per_step_and_never_sees_a_hidden_state(
    model_dir, monkeypatch
):
    with in_process_mesh(model_dir, 3) as mesh:
        router = mesh.orchestrator.router
        links = [router.client(a).link() for a in mesh.addresses]  # each an outlet
        answered: list[list] = [[] for _ in links]
        for link, answers in zip(links, answered, strict=True):
            on_reply = link.on_reply
            monkeypatch.setattr(
                link, "on_reply", lambda r, a=answers, f=on_reply: (a.append(r), f(r))
            )
        sent = []
        send = links[0].send
        monkeypatch.setattr(links[0], "send", lambda steps: (sent.extend(steps), send(steps)))
        result = mesh.client.generate(token_ids=PROMPT, max_new_tokens=12, ignore_eos=True)
        assert result.token_ids == reference_greedy(model_dir, PROMPT, 12)
        answers = answered[-1]  # only the last stage answers
        assert len(sent) == len(answers) == 12 and answered[:-1] == [[], []]
        assert all(list(s.route) == mesh.addresses and not s.HasField("hidden") for s in sent)
        assert all(not a.HasField("hidden") and not a.error_code for a in answers)
        assert all(len(a.route_compute_ns) == 3 and min(a.route_compute_ns) > 0 for a in answers)
        t = result.timings
        assert t["mesh_overhead_ms"] > 0
        assert t["hop_overhead_ms"] == pytest.approx(t["mesh_overhead_ms"] / 3)
