"""The batch-invariant mode (`--batch-invariant`): a row's result is bit-identical whatever else
shares its step. First the range itself (no server): a session's logits, hidden states and
cache, for every dtype and weight format, computed as one prefill, token by token, beside other
sessions' rows in either order, in prefill chunks and as verify rows. Then through a real gRPC
mesh: a session alone, beside 5 others, with lookup speculation on and off, and replayed after a
reload, gives bit-identical ids and log-probabilities; and a failover replay with processes."""

from __future__ import annotations

import threading

import pytest
import torch

from protos.shared.model_files import LlamaArgs, read_config
from stage_service.fused_layers import range_model
from stage_service.model import Segment
from stage_service.weights import Quantization, load_range
from tests.conftest import TINY_CONFIGS, in_process_mesh, make_tiny_model

CPU = torch.device("cpu")
# (dtype, quantization): every weight format a CPU stage has
FORMATS = {
    "float32": (torch.float32, Quantization("none", 0, True)),
    "bfloat16": (torch.bfloat16, Quantization("none", 0, True)),
    "float16": (torch.float16, Quantization("none", 0, True)),
    "int8": (torch.float32, Quantization("int8", 64, True)),
    "int4": (torch.float32, Quantization("int4", 32, True)),
}
PROMPT = [7, 3, 99, 12, 45, 7, 3, 99, 12, 45, 7, 3, 99, 60, 2]  # repeats: lookup drafts
NEW_TOKENS = 24


class Range:
    """A whole tiny model as one range in the batch-invariant mode, and fresh caches for it."""

    def __init__(self, model_dir, fmt: str):
        self.args = LlamaArgs.from_config(read_config(model_dir))
        self.dtype, quant = FORMATS[fmt]
        n = self.args.num_layers
        weights = load_range(model_dir, self.args, 0, n, self.dtype, CPU, quant)
        self.model = range_model(self.args, weights, CPU, batch_invariant=True)
        assert self.model.fused is not None and self.model.fused.every_step

    def cache(self, capacity: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (self.args.num_kv_heads, capacity, self.args.head_dim)
        zeros = lambda: torch.zeros(shape, dtype=self.dtype)  # noqa: E731
        return [(zeros(), zeros()) for _ in range(self.args.num_layers)]

    def step(self, parts: list[tuple[list, int, list[int]]]) -> list[torch.Tensor]:
        """parts: (cache, start_pos, token ids) per session, in the step's row order. Returns
        every row's logits, per session."""
        segments, ids, row = [], [], 0
        for kv, start, tokens in parts:
            segments.append(Segment(slice(row, row + len(tokens)), start, kv))
            ids += tokens
            row += len(tokens)
        logits = self.model.run(segments, torch.tensor(ids), None, all_logits=True)
        return [logits[s.rows] for s in segments]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_a_sessions_rows_are_the_same_whatever_shares_their_step(tiny_root, name, fmt):
    r = Range(make_tiny_model(tiny_root, name), fmt)
    seq = PROMPT + [11, 4, 9, 60, 1]
    others = [[5, 17, 3, 99, 42, 8, 8], [1, 2], [64, 33, 21]]

    alone = r.cache()
    want = r.step([(alone, 0, seq)])[0]  # one prefill
    ways = {}
    kv = r.cache()  # token by token
    ways["one row a step"] = torch.cat([r.step([(kv, i, [t])])[0] for i, t in enumerate(seq)])
    ways["its caches, token by token"] = kv
    kv, crowd = r.cache(), [r.cache() for _ in others]  # beside other sessions, both orders
    rows = []
    for i, t in enumerate(seq):
        parts = [(c, i, [o[i % len(o)]]) for c, o in zip(crowd, others, strict=True)]
        mine = (kv, i, [t])
        order = [mine, *parts] if i % 2 else [*parts, mine]
        got = r.step(order)
        rows.append(got[0] if i % 2 else got[-1])
    ways["beside 3 sessions, either order"] = torch.cat(rows)
    kv, rows = r.cache(), []  # chunks of 4, beside another session's prefill and decode rows
    for start in range(0, len(seq), 4):
        chunk = seq[start : start + 4]
        other = r.cache()
        got = r.step([(other, 0, others[0]), (kv, start, chunk), (r.cache(), 0, [3])])
        rows.append(got[1])
    ways["in prefill chunks beside others"] = torch.cat(rows)
    kv = r.cache()  # a token and its drafts as one verify step, after a prefill
    head = r.step([(kv, 0, seq[:10])])[0]
    tail = r.step([(r.cache(), 0, [9, 9, 9]), (kv, 10, seq[10:])])[1]
    ways["as verify rows"] = torch.cat([head, tail])
    for way, got in ways.items():
        if way.startswith("its caches"):
            for (k, v), (k2, v2) in zip(got, alone, strict=True):
                assert torch.equal(k, k2) and torch.equal(v, v2), way
        else:
            assert torch.equal(got, want), f"{way}: max diff {(got - want).abs().max():.3g}"


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("invariant"), "gqa")


def crowded(mesh, prompt: list[int], speculate: str, others: int = 5):
    """The session's result while `others` other sessions decode at the same time."""
    g = torch.Generator().manual_seed(11)
    prompts = [prompt] + [
        torch.randint(0, 101, (4 + 3 * i,), generator=g).tolist() for i in range(others)
    ]
    results: dict[int, object] = {}
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        start.wait()
        results[i] = mesh.client.generate(
            token_ids=prompts[i], max_new_tokens=NEW_TOKENS + 8 * (i > 0), speculate=speculate
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results[0]


def record_batches(stage) -> list[int]:
    """Sessions per forward of `stage`, recorded from now on."""
    seen: list[int] = []
    metrics = stage.metrics
    observe = metrics.observe

    def recording(sessions: int, compute_s: float) -> None:
        seen.append(sessions)
        observe(sessions, compute_s)

    metrics.observe = recording
    return seen


OPTIONS = {
    "float32": dict(),
    "float32-static": dict(static_kv="on", max_context=96),
    "bfloat16": dict(dtype="bfloat16"),
    "int8": dict(quantize="int8"),
}
if torch.cuda.is_available():  # bench/gpu.sh's machine: the Triton kernels, CUDA graphs
    OPTIONS["cuda-bfloat16"] = dict(device="cuda", dtype="bfloat16", max_context=96)


# Outside the mode (README): log-probabilities this close, and ids equal up to a near-tie: where
# two runs first pick different tokens, their log-probabilities there are this close too.
DEFAULT_MODE_TOLERANCE = {"float32": 1e-5, "bfloat16": 0.05}


def assert_same_up_to_near_ties(ids, logprobs, want_ids, want_logprobs, tolerance, way):
    differ = [i for i, (a, b) in enumerate(zip(ids, want_ids, strict=True)) if a != b]
    first = differ[0] if differ else len(ids)
    if differ:  # a near-tie: both tokens about as likely
        gap = abs(logprobs[first] - want_logprobs[first])
        assert gap <= tolerance, f"{way}: token {first} differs and is no near-tie ({gap:.3g})"
    gaps = [abs(a - b) for a, b in zip(logprobs[:first], want_logprobs[:first], strict=True)]
    assert max(gaps, default=0.0) <= tolerance, way


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("setting", sorted(OPTIONS))
def test_a_session_is_bit_identical_alone_crowded_speculative_and_replayed(gqa, setting, mode):
    """In the mode: bit-identical. Outside it: what the README promises there."""
    if mode == "off" and setting.startswith("cuda"):
        pytest.skip("the default mode's GPU numbers are in bench/gpu_invariant.py")
    options = dict(OPTIONS[setting], batch_invariant=mode, allow_slow_dtype=True)
    with in_process_mesh(gqa, 3, plan_stages=2, stage_options=options) as mesh:
        client = mesh.client
        alone = client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS, speculate="off")
        runs = {"alone, lookup": client.generate(token_ids=PROMPT, max_new_tokens=NEW_TOKENS)}
        batches = record_batches(mesh.stages[1])  # the last of the first plan
        runs["beside 5 others"] = crowded(mesh, PROMPT, "off")
        runs["beside 5 others, lookup"] = crowded(mesh, PROMPT, "lookup")
        # a reload mid-stream: the session replays its history on the new plan. The stream
        # may finish before the reload lands (the orchestrator runs ahead of its client), so
        # up to 3 tries, each one's output checked below
        for attempt, boundaries in enumerate(["0-1,2,3", "0,1-2,3", "0-1,2,3"]):
            stream = client.stream(token_ids=PROMPT, max_new_tokens=NEW_TOKENS, speculate="off")
            pieces = [next(stream) for _ in range(2)]
            client.reload_plan(strategy="custom", boundaries=boundaries, stages=mesh.addresses)
            pieces += list(stream)
            runs[f"reload try {attempt}"] = pieces
            if pieces[-1].timings["replays"] >= 1:
                break
    assert max(batches) > 1  # sessions really shared steps
    assert int(runs["alone, lookup"].timings["drafted_tokens"]) > 0  # verify steps ran
    assert pieces[-1].timings["replays"] >= 1
    for way, got in runs.items():
        ids = [t for p in got for t in p.token_ids] if isinstance(got, list) else got.token_ids
        logprobs = [x for p in got for x in p.logprobs] if isinstance(got, list) else got.logprobs
        if mode == "on":
            assert ids == alone.token_ids, way
            assert logprobs == alone.logprobs, way  # bit for bit, not within a tolerance
        else:
            tolerance = DEFAULT_MODE_TOLERANCE["bfloat16" if "bfloat16" in setting else "float32"]
            assert_same_up_to_near_ties(
                ids, logprobs, alone.token_ids, alone.logprobs, tolerance, way
            )


@pytest.mark.slow
def test_a_failover_replay_mid_output_is_bit_identical(tmp_path):
    """Processes: the replica serving a session is killed mid-stream; the session is replayed
    onto the other replica and its ids and log-probabilities equal an uninterrupted run's."""
    from tests.test_failover import Mesh, kill, the_one_serving

    model_dir = make_tiny_model(tmp_path, "untied_mha")
    mesh = Mesh(model_dir, tmp_path)
    try:
        a, b, c = (mesh.stage(n, 0, "--batch-invariant", "on") for n in "abc")
        client = mesh.orchestrator(f"{a.address}+{b.address},{c.address}")
        whole = client.generate(token_ids=PROMPT, max_new_tokens=120, speculate="off")
        stream = client.stream(token_ids=PROMPT, max_new_tokens=120, speculate="off")
        pieces = [next(stream) for _ in range(40)]
        victim, _ = the_one_serving(client, a, b)
        kill(victim)
        pieces += list(stream)
    finally:
        mesh.stop()
    assert pieces[-1].timings["replays"] >= 1
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert [x for p in pieces for x in p.logprobs] == whole.logprobs


GPU_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@pytest.mark.parametrize("dtype", sorted(GPU_DTYPES))
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_gpu_rows_are_the_same_as_prefill_decode_graphs_and_crowded(tiny_root, name, dtype):
    """The GPU kernels (invariant_gpu.py): a session's logits as one prefill, token by token,
    in chunks beside another session, and decoded through the static decoder (CUDA graphs on
    a GPU) beside other slots' rows, are bit-identical."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU here (bench/gpu.sh's machine runs this)")
    from stage_service import invariant_gpu
    from stage_service.decode import StaticDecoder
    from stage_service.kv_cache import CacheShape, SlotPool

    dev = torch.device("cuda")
    model_dir = make_tiny_model(tiny_root, name)
    args = LlamaArgs.from_config(read_config(model_dir))
    n = args.num_layers
    weights = load_range(model_dir, args, 0, n, GPU_DTYPES[dtype], dev, Quantization("none", 0))
    model = range_model(args, weights, dev, batch_invariant=True)
    assert model.gpu_invariant is invariant_gpu and model.fused is None
    shape = CacheShape(n, args.num_kv_heads, args.head_dim, GPU_DTYPES[dtype], dev, 64)
    pool = SlotPool(shape, 6)

    def step(parts):  # (slot, start, tokens) per session -> logits per session
        segments, ids, row = [], [], 0
        for slot, start, tokens in parts:
            rows = slice(row, row + len(tokens))
            segments.append(Segment(rows, start, pool.views(slot), slot))
            ids += tokens
            row += len(tokens)
        out = model.run(segments, torch.tensor(ids, device=dev), None, True, pool=pool)
        return [out[s.rows].cpu() for s in segments]

    seq = PROMPT + [11, 4, 9, 60, 1]
    want = step([(0, 0, seq)])[0]
    by_token = torch.cat([step([(1, i, [t])])[0] for i, t in enumerate(seq)])
    chunks = torch.cat(
        [step([(3, 0, [5, 6, 7]), (2, c, seq[c : c + 4])])[1] for c in range(0, len(seq), 4)]
    )
    decoder = StaticDecoder(model, pool, 8, graphs=True)
    decoder.capture_all()
    first = step([(4, 0, seq[:6])])[0]
    rows = [first]
    for i in range(6, len(seq)):  # slot 4 decodes beside slot 5's rows, which come and go
        slots, positions, tokens = [4], [i], [seq[i]]
        if i % 2:
            slots, positions, tokens = [5, 4, 5], [0, i, 1], [8, seq[i], 9]
        out = decoder.run(slots, positions, tokens, None)
        rows.append(out[slots.index(4)][None].cpu().clone())
    decoded = torch.cat(rows)
    for way, got in (("by token", by_token), ("chunks", chunks), ("decoded", decoded)):
        assert torch.equal(got, want), f"{way}: max diff {(got - want).abs().max():.3g}"


def test_gpu_log_sum_exp_of_a_row_does_not_depend_on_the_rows_beside_it():
    """The greedy log-probabilities' normaliser (sampling.logsumexp_rows) on a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU here (bench/gpu.sh's machine runs this)")
    from stage_service.sampling import logsumexp_rows

    rows = torch.randn(37, 128256, device="cuda") * 4
    rows[5, :1000] = float("-inf")
    together = logsumexp_rows(rows)
    alone = torch.cat([logsumexp_rows(rows[i : i + 1]) for i in range(len(rows))])
    assert torch.equal(together, alone)
    torch.testing.assert_close(together, torch.logsumexp(rows, -1), rtol=1e-6, atol=1e-5)
