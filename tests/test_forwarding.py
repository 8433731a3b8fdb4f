"""Stage-to-stage forwarding seen from the orchestrator: every step is one message in and one
answer out, the answer holds no hidden state and every stage's compute time, and the greedy
output is transformers' own."""

from __future__ import annotations

import pytest

from tests.batches import count_taken
from tests.conftest import in_process_mesh, make_tiny_model, reference_greedy

PROMPT = [7, 3, 99, 12, 45, 60, 2, 81]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("forwarding"), "untied_mha")  # 6 layers


def test_the_orchestrator_sends_one_message_per_step_and_never_sees_a_hidden_state(
    model_dir, monkeypatch
):
    # one step per token: speculation off (a verify step carries several tokens)
    with in_process_mesh(model_dir, 3, speculate="off") as mesh:
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
        assert all(list(a.route_batch_sizes) == [1, 1, 1] for a in answers)  # one session
        assert [s["mean_batch_size"] for s in result.timings["stages"]] == [1.0, 1.0, 1.0]
        t = result.timings
        assert t["mesh_overhead_ms"] > 0
        assert t["hop_overhead_ms"] == pytest.approx(t["mesh_overhead_ms"] / 3)


def test_steps_batched_at_one_stage_travel_to_the_next_as_one_batch(model_dir, monkeypatch):
    """Prompts queued behind a busy stage 0 run there as one batch, go on to stage 1 as one
    message and run there as one batch too; every answer says so, and the tokens stay exact."""
    import threading
    import time

    with in_process_mesh(model_dir, 2) as mesh:
        stage0 = mesh.stages[0]
        last = mesh.orchestrator.router.client(mesh.addresses[-1]).link()
        answers = []
        on_reply = last.on_reply
        monkeypatch.setattr(last, "on_reply", lambda r: (answers.append(r), on_reply(r)))
        results = {}

        def run(i: int) -> None:
            results[i] = mesh.client.generate(token_ids=[*PROMPT, i + 1], max_new_tokens=4)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        taken = count_taken(stage0)
        with stage0.holder.compute_lock:  # stage 0 is busy: the first prompt waits taken, the
            threads[0].start()  # rest queue
            while taken() == 0:
                time.sleep(0.01)
            for t in threads[1:]:
                t.start()
            while len(stage0.batcher._queue) < 3:
                time.sleep(0.01)
        for t in threads:
            t.join(60)
        prefills = [list(a.route_batch_sizes) for a in answers if a.route_compute_ns][:4]
        assert sorted(b[0] for b in prefills) == [1, 3, 3, 3]
        assert sum(b[1] >= 3 for b in prefills) >= 3  # the three went on as one batch
        for i, result in results.items():
            assert result.token_ids == reference_greedy(model_dir, [*PROMPT, i + 1], 4)
