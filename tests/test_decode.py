"""The fixed-shape decode step over static KV slots (stage_service/decode.py; on a GPU it runs as
CUDA graphs, here eagerly): dense and gathered attention give the logits of the general path,
rows come back in the step's order, and slots outside the step are left untouched."""

from __future__ import annotations

import pytest
import torch

from protos.shared.model_files import LlamaArgs, read_config
from stage_service.decode import StaticDecoder
from stage_service.kv_cache import CacheShape, SessionCache
from stage_service.model import RangeModel, Segment
from stage_service.weights import load_range
from tests.conftest import make_tiny_model

CPU = torch.device("cpu")


def setup(tmp_path, sessions: int):
    model_dir = make_tiny_model(tmp_path, "gqa")
    args = LlamaArgs.from_config(read_config(model_dir))
    model = RangeModel(args, load_range(model_dir, args, 0, 4, torch.float32, CPU), CPU)
    shape = CacheShape(4, args.num_kv_heads, args.head_dim, torch.float32, CPU, 64)
    static = SessionCache(shape, 8 * 64 * shape.bytes_per_token, 60, static=True)
    growable = SessionCache(shape, 2**24, 60)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (3 + 2 * i,), generator=g).tolist() for i in range(sessions)]
    for i, prompt in enumerate(prompts):
        for cache in (static, growable):
            session = cache.begin_step(f"s{i}", 0, len(prompt))
            model.run([Segment(slice(0, len(prompt)), 0, session.kv)], torch.tensor(prompt), None)
            session.length = len(prompt)
    return model, static, growable, prompts


def reference(model, growable, picks, prompts, tokens):
    """The general path (checked against transformers elsewhere) on growable caches."""
    segments = []
    for row, i in enumerate(picks):
        session = growable.begin_step(f"s{i}", len(prompts[i]), 1)
        segments.append(Segment(slice(row, row + 1), len(prompts[i]), session.kv))
    return model.run(segments, torch.tensor(tokens), None)


def decode(decoder, static, picks, prompts, tokens):
    slots = [static.begin_step(f"s{i}", len(prompts[i]), 1).slot for i in picks]
    return decoder.run(slots, [len(prompts[i]) for i in picks], tokens, None)


def test_dense_and_gathered_steps_equal_the_general_path(tmp_path):
    model, static, growable, prompts = setup(tmp_path, 6)
    decoder = StaticDecoder(model, static.pool, 8, graphs=False)
    before = [static.pool.k[0][slot].clone() for slot in range(6)]
    # slots 3 and 1 (2 rows, slots below 4): dense; slot 5 alone: gathered; 5 and 0: gathered
    for picks, tokens in (([3, 1], [11, 12]), ([5], [13]), ([0, 2, 4], [14, 15, 16])):
        got = decode(decoder, static, picks, prompts, tokens)
        want = reference(model, growable, picks, prompts, tokens)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for i in picks:
            prompts[i] = prompts[i] + [tokens[picks.index(i)]]
    for slot in range(6):  # each slot changed at its own new positions only
        length = len(prompts[slot]) - 1
        torch.testing.assert_close(
            static.pool.k[0][slot][:, :length], before[slot][:, :length], rtol=0, atol=0
        )


def test_dense_step_leaves_the_slots_of_other_sessions_alone(tmp_path):
    model, static, growable, prompts = setup(tmp_path, 4)
    decoder = StaticDecoder(model, static.pool, 8, graphs=False)
    snapshot = [(k.clone(), v.clone()) for k, v in zip(static.pool.k, static.pool.v, strict=True)]
    got = decode(decoder, static, [3], prompts, [9])  # 1 row at slot 3: gathered (bucket 4 > 2)
    want = reference(model, growable, [3], prompts, [9])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got = decode(decoder, static, [2, 0], prompts, [7, 8])  # dense over slots 0..3
    want = reference(model, growable, [2, 0], prompts, [7, 8])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for layer, (k, v) in enumerate(zip(static.pool.k, static.pool.v, strict=True)):
        for slot in (1,):  # in the dense step's rows, but not one of its sessions
            assert torch.equal(k[slot], snapshot[layer][0][slot])
            assert torch.equal(v[slot], snapshot[layer][1][slot])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("start", [0, 2])
def test_graph_steps_on_a_gpu_equal_the_eager_steps(tmp_path, start):
    """The graphs' inputs go up from pinned buffers by async copies; every kind of step
    (dense with rows in slot order or permuted into their slots, gathered; tokens on a first
    stage, hidden rows on the others) gives what the eager step gives on the same device."""
    dev = torch.device("cuda")
    model_dir = make_tiny_model(tmp_path, "gqa")
    args = LlamaArgs.from_config(read_config(model_dir))
    model = RangeModel(args, load_range(model_dir, args, start, 4, torch.float32, dev), dev)
    shape = CacheShape(4 - start, args.num_kv_heads, args.head_dim, torch.float32, dev, 64)
    caches = [SessionCache(shape, 8 * 64 * shape.bytes_per_token, 60, static=True)
              for _ in range(2)]  # fmt: skip
    g = torch.Generator().manual_seed(2)
    lengths = [3 + 2 * i for i in range(6)]
    for i, n in enumerate(lengths):
        ids = torch.randint(0, 101, (n,), generator=g)
        hidden = None if start == 0 else torch.randn(n, args.hidden_size, generator=g).to(dev)
        for cache in caches:
            session = cache.begin_step(f"s{i}", 0, n)
            model.run([Segment(slice(0, n), 0, session.kv)], ids.to(dev), hidden)
            session.length = n
    graphed = StaticDecoder(model, caches[0].pool, 8, graphs=True)
    graphed.capture_all()
    eager = StaticDecoder(model, caches[1].pool, 8, graphs=False)
    # dense in slot order, dense permuted, gathered, gathered of three, dense permuted of four
    for picks in ([0, 1], [3, 1], [5], [0, 2, 4], [1, 0, 3, 2]):
        tokens = torch.randint(0, 101, (len(picks),), generator=g).tolist()
        hidden = None if start == 0 else torch.randn(len(picks), args.hidden_size, generator=g)
        outs = []
        for decoder, cache in ((graphed, caches[0]), (eager, caches[1])):
            sessions = [cache.begin_step(f"s{i}", lengths[i], 1) for i in picks]
            slots = [session.slot for session in sessions]
            outs.append(decoder.run(slots, [lengths[i] for i in picks], tokens, hidden).clone())
            for session, i in zip(sessions, picks, strict=True):
                session.length = lengths[i] + 1
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        for i in picks:
            lengths[i] += 1
