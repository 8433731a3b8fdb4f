"""Greedy tokens through a real gRPC mesh (orchestrator + 1, 2, 3 stages in process) equal
transformers' LlamaForCausalLM.generate on the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_CONFIGS, in_process_mesh, make_tiny_model, reference_greedy

NEW_TOKENS = 32


@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_models_generate_exactly_as_transformers(tiny_root, name, num_stages):
    model_dir = make_tiny_model(tiny_root, name)
    prompt = torch.randint(0, 101, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = reference_greedy(model_dir, prompt, NEW_TOKENS)
    with in_process_mesh(model_dir, num_stages) as mesh:
        result = mesh.client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS)
        plan = mesh.client.plan()
    assert result.token_ids == expected
    assert result.finish_reason == "length"
    assert len(plan["stages"]) == num_stages


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_static_kv_slots_generate_exactly_as_transformers(tiny_root, name):
    """The GPU layout (static slots, fixed-shape decode step; eager here, CUDA graphs on a GPU),
    with several sessions decoding at once so that batches mix slots and lengths."""
    import threading

    model_dir = make_tiny_model(tiny_root, name)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 101, (5 + 7 * i,), generator=g).tolist() for i in range(4)]
    expected = [reference_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    options = dict(static_kv="on", max_context=96, batch_invariant="off")
    results: dict[int, object] = {}
    with in_process_mesh(model_dir, 2, stage_options=options) as mesh:

        def run(i: int) -> None:
            results[i] = mesh.client.generate(token_ids=prompts[i], max_new_tokens=NEW_TOKENS)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        infos = [stage.info() for stage in mesh.stages]
    assert [results[i].token_ids for i in range(len(prompts))] == expected
    assert all(info["active_sessions"] == 0 for info in infos)  # slots given back


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_default_model_generates_exactly_as_transformers(default_model, num_stages):
    from transformers import AutoTokenizer

    prompt = "The history of the Roman Empire"
    ids = AutoTokenizer.from_pretrained(str(default_model))(prompt)["input_ids"]
    expected = reference_greedy(default_model, ids, NEW_TOKENS)
    with in_process_mesh(default_model, num_stages) as mesh:
        result = mesh.client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        streamed = list(mesh.client.stream(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert result.prompt_tokens == len(ids)
    assert result.token_ids == expected
    assert [t for piece in streamed for t in piece.token_ids] == expected
    assert "".join(p.text for p in streamed) == result.text
    assert streamed[-1].finish_reason == "length" and streamed[-1].timings["ttft_ms"] > 0
