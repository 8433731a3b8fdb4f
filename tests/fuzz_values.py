"""Value strategies for the fuzz test (tests/test_fuzz.py): hypothesis strategies for the fields
of a request (numbers at and past their limits, text the tokenizer and the chat template react
to, token ids, tensors of random shape, dtype and data, sampling parameters) and the byte
mutator that edits valid serialized requests. The tiny model's shape is declared here because
the values are drawn around it."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from protos import llamadist_pb2 as pb

# The tiny model: 4 layers, hidden size 64, context 256, and the default model's (SmolLM2's)
# tokenizer: its vocabulary of 49152 (checked against the default model's config), bos 1, eos 2.
VOCAB, HIDDEN, LAYERS, CONTEXT = 49152, 64, 4, 256
PROMPT = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, picked with the given integer weights."""
    table = [s for w, s in choices for _ in range(w)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


I64 = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -(2**63)]),
    st.integers(-3, CONTEXT + 3),
)
U64 = st.one_of(
    st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 10)
)
I32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]),
    st.integers(-3, 10),
)
F32 = st.one_of(
    st.floats(width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 3.4e38, float("nan"), float("inf")]),
)
# Text that means something to the tokenizer or the chat template (special tokens, Jinja).
SPECIAL_TEXT = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>assistant\n",
    "{{ messages }}",
    "{% for m in messages %}{{ m }}{% endfor %}",
    "{{ raise_exception('x') }}",
    "\ufffd",
    "\r\n\t",
    "Hello, world! What is the capital of France?",
]
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "a" * 129, "é", "\U0001d11e", "../../etc", "%s%n{}"]),
    st.sampled_from(SPECIAL_TEXT),
)
PROMPT_TEXT = weighted(
    (6, TEXT),
    (1, st.integers(1, 200).map(lambda n: "the cat sat. " * n)),  # up to ~800 tokens
    (1, st.text(min_size=200, max_size=600)),
)
# Fragments that random text often contains, so stop strings are hit; and the limits (16 strings
# of 1 to 256 characters).
STOP = weighted(
    (4, st.just([])),
    (3, st.lists(st.sampled_from(["e", " ", "a", "\n", ".", "the", "in", "\ufffd"]), max_size=3)),
    (1, st.lists(TEXT, max_size=3)),
    (1, st.sampled_from([[""], ["a" * 256], ["a" * 257], ["x"] * 16, ["x"] * 17, ["<|im_end|>"]])),
)
SESSION = weighted(
    (3, st.from_regex(r"[A-Za-z0-9._:-]{1,16}", fullmatch=True)),
    (2, st.sampled_from(["s", "fuzz-0", "fuzz-1", "seed-0", "x" * 128, "x" * 129, "a b", "ü"])),
    (1, TEXT),
)
TOKENS = weighted(
    (8, st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24)),
    (1, st.just([])),
    (2, st.lists(st.one_of(st.integers(-2, VOCAB + 1), I64), max_size=6)),
    (1, st.lists(st.integers(0, VOCAB - 1), min_size=CONTEXT - 8, max_size=CONTEXT + 8)),
)
MAX_NEW_TOKENS = weighted((16, st.integers(1, 8)), (1, st.just(0)), (3, I32))
DTYPE = weighted((6, st.sampled_from([pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16])), (1, I32))
ITEMSIZE = {pb.FLOAT32: 4, pb.BFLOAT16: 2, pb.FLOAT16: 2}
TORCH_DTYPE = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}


@st.composite
def tensors(draw, rows: int | None = None) -> pb.Tensor:
    """Random shape, dtype and data; often the shape a stage expects, with finite values or a
    NaN, an Inf or huge values, sometimes a byte length that does not match."""
    dtype = draw(DTYPE)
    if rows is not None and draw(st.integers(0, 2)):
        shape = [rows, HIDDEN]
    else:
        shape = draw(st.lists(st.one_of(st.integers(-2, 80), I64), max_size=4))
    msg = pb.Tensor(shape=shape, dtype=dtype)
    numel = 1
    for d in shape:
        numel *= d
    itemsize = ITEMSIZE.get(dtype, 4)
    if 0 <= numel * itemsize <= 2**20 and draw(st.integers(0, 3)):
        values = torch.randn(numel, generator=torch.Generator().manual_seed(draw(U64) % 2**32))
        poison = draw(st.sampled_from(["", "", "", "nan", "inf", "huge"]))
        if poison and numel:
            at = draw(st.integers(0, numel - 1))
            values[at] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e38}[poison]
        values = values.to(TORCH_DTYPE.get(dtype, torch.float32))
        data = values.view(torch.uint8).numpy().tobytes() if numel else b""
        cut = draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
        msg.data = data[:-1] if cut == -1 else data + b"\0" * cut
    else:
        msg.data = draw(st.binary(max_size=512))
    return msg


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    """Greedy, valid random parameters, or anything (NaN, Inf, negative, huge)."""
    kind = draw(st.sampled_from(["greedy", "valid", "valid", "any"]))
    msg = pb.SamplingParams()
    if kind == "greedy":
        return msg
    valid = {
        "temperature": st.floats(0.0, 2.0, width=32),
        "top_p": st.floats(0.0625, 1.0, width=32),
        "repetition_penalty": st.floats(0.5, 2.0, width=32),
    }
    for name, values in valid.items():
        if draw(st.booleans()):
            setattr(msg, name, draw(values if kind == "valid" else F32))
    if draw(st.booleans()):
        msg.top_k = draw(st.integers(0, VOCAB + 5) if kind == "valid" else I32)
    if draw(st.booleans()):
        msg.seed = draw(U64)
    return msg


def mutate(seeds: list[bytes], pick: int, edits: list[dict]) -> bytes:
    """seeds[pick] with the edits made in order."""
    data = bytearray(seeds[pick])
    for e in edits:
        at = e["at"] % (len(data) + 1)
        inside = min(at, len(data) - 1)
        if e["op"] == "flip" and data:
            data[inside] ^= 1 << e["bit"]
        elif e["op"] == "truncate":
            del data[at:]
        elif e["op"] == "insert":
            data[at:at] = e["blob"]
        elif e["op"] == "delete":
            del data[at : at + e["n"]]
        elif e["op"] == "set" and data:
            data[inside] = e["byte"]
        elif e["op"] == "field":  # a stray field: any number, any wire type, any payload
            data += varint(e["tag"] | e["bit"]) + e["blob"]
        elif e["op"] == "concat":  # two messages back to back: protobuf merges them
            data += seeds[e["other"] % len(seeds)]
    return bytes(data)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
