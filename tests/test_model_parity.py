"""Our layer-range math against transformers' LlamaForCausalLM on the same weights, no gRPC:
the model split into ranges, prefill and step-by-step decode through the KV cache."""

from __future__ import annotations

import pytest
import torch

from protos.shared.model_files import LlamaArgs, read_config
from stage_service.kv_cache import CacheShape, SessionCache
from stage_service.model import RangeModel, Segment
from stage_service.weights import load_range
from tests.conftest import TINY_CONFIGS, make_tiny_model, reference_model

CPU = torch.device("cpu")


def split_models(model_dir, bounds: list[int]) -> tuple[LlamaArgs, list[RangeModel]]:
    args = LlamaArgs.from_config(read_config(model_dir))
    models = [
        RangeModel(args, load_range(model_dir, args, a, b, torch.float32, CPU), CPU)
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    return args, models


def run_chain(models, caches, session: str, start: int, ids: list[int]) -> torch.Tensor:
    hidden = None
    for model, cache in zip(models, caches, strict=True):
        s = cache.begin_step(session, start, len(ids))
        segment = Segment(slice(0, len(ids)), start, s.kv)
        hidden = model.run([segment], torch.tensor(ids), hidden, all_logits=True)
        s.length = start + len(ids)
    return hidden


def caches_for(args: LlamaArgs, models: list[RangeModel]) -> list[SessionCache]:
    return [
        SessionCache(
            CacheShape(
                len(m.weights.layers),
                args.num_kv_heads,
                args.head_dim,
                torch.float32,
                CPU,
                args.max_position_embeddings,
            ),
            budget_bytes=2**26,
            ttl_s=600,
        )
        for m in models
    ]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_split_prefill_and_decode_match_transformers(tiny_root, name):
    model_dir = make_tiny_model(tiny_root, name)
    args = LlamaArgs.from_config(read_config(model_dir))
    layers = args.num_layers
    ref = reference_model(model_dir)
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (40,)).tolist()
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    for bounds in ([0, layers], [0, 1, layers], [0, layers // 2, layers - 1, layers]):
        _, models = split_models(model_dir, bounds)
        caches = caches_for(args, models)
        # prefill 30 tokens, then one token at a time through the cache
        got = [run_chain(models, caches, "s", 0, ids[:30])]
        got += [run_chain(models, caches, "s", p, [ids[p]]) for p in range(30, 40)]
        torch.testing.assert_close(torch.cat(got), expected, atol=1e-4, rtol=0)


def test_replay_from_an_earlier_position_rewrites_the_cache(tiny_root):
    model_dir = make_tiny_model(tiny_root, "gqa")
    args, models = split_models(model_dir, [0, 2, 4])
    caches = caches_for(args, models)
    ids = list(range(1, 21))
    first = run_chain(models, caches, "s", 0, ids)
    run_chain(models, caches, "s", 20, [5, 6, 7])  # then cut back to 20 and go on differently
    again = run_chain(models, caches, "s", 20, [9])
    fresh_caches = caches_for(args, models)
    run_chain(models, fresh_caches, "t", 0, ids)
    expected = run_chain(models, fresh_caches, "t", 20, [9])
    torch.testing.assert_close(again, expected, atol=0, rtol=0)
    assert first.shape == (20, args.vocab_size)


def test_default_model_logits_match_transformers(default_model):
    args = LlamaArgs.from_config(read_config(default_model))
    assert (args.num_layers, args.num_heads, args.num_kv_heads) == (30, 9, 3)
    ref = reference_model(default_model)
    ids = list(range(100, 124))
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    _, models = split_models(default_model, [0, 15, 30])
    caches = caches_for(args, models)
    got = torch.cat(
        [run_chain(models, caches, "s", 0, ids[:20])]
        + [run_chain(models, caches, "s", p, [ids[p]]) for p in range(20, 24)]
    )
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
