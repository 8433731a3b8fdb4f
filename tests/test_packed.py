"""Float matrices packed for the C layers (stage_service/packed.py, qlinear.c's f_linear)."""

import pytest
import torch
import torch.nn.functional as F

from stage_service import cpu_kernels
from stage_service.packed import PackedFloat
from stage_service.quant import Int4Weight, Int8Weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, K): whole blocks of 16 channels, blocks and plain rows, plain rows only, odd K
SHAPES = [(64, 48), (37, 24), (5, 7), (100, 1536), (33, 5)]


def matrix(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_packing_keeps_the_matrix_and_its_rows(shape, dtype):
    w = matrix(*shape, dtype)
    packed = PackedFloat.pack(w)
    assert packed.nbytes == w.numel() * w.element_size()  # no padding, no second copy
    assert torch.equal(packed.dequantize(), w)
    n = shape[0]
    ids = torch.tensor([0, n - 1, n // 2, min(17, n - 1), n - 1, 0])
    assert torch.equal(packed.embedding(ids, torch.float32), w[ids].float())


@pytest.mark.skipif(cpu_kernels.load()[0] is None, reason="the C kernels cannot run here")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_each_output_is_the_same_bits_whatever_rows_share_the_call(shape, dtype, threads):
    """Every row count takes another tile shape (1-3 rows: two blocks at a time; from 4: tiles
    of 6 and a rest); each row's outputs are the same bits in all of them, in any order, with
    any thread count, and equal F.linear up to float32 sums."""
    w = matrix(*shape, dtype)
    packed = PackedFloat.pack(w)
    bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, shape[1], generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        every = packed.linear(x, bias)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 13, 64):
            y = packed.linear(x[:rows], bias)
            assert torch.equal(y, every[:rows]), rows
            order = torch.randperm(rows, generator=torch.Generator().manual_seed(rows))
            assert torch.equal(packed.linear(x[:rows][order], bias), y[order]), rows
            torch.testing.assert_close(y, F.linear(x[:rows], w.float(), bias), atol=2e-5, rtol=0)
    finally:
        torch.set_num_threads(before)


KERNELS = cpu_kernels.load()[0]


@pytest.mark.skipif(
    KERNELS is None or "avx512f" not in cpu_kernels.cpu_flags(), reason="this CPU has no AVX-512"
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_avx512_kernel_gives_the_avx2_kernels_bits(shape, dtype):
    """A stage on an AVX-512 CPU computes what one on an AVX2 CPU does, bit for bit (a replica
    on the other kind replays a session exactly)."""
    w = matrix(*shape, dtype)
    packed = PackedFloat.pack(w)
    bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, shape[1], generator=torch.Generator().manual_seed(2))
    try:
        for rows in (1, 2, 3, 5, 8, 9, 64):
            assert KERNELS.use_isa("avx512") == "avx512"
            wide = packed.linear(x[:rows], bias)
            assert KERNELS.use_isa("avx2") == "avx2"
            assert torch.equal(wide, packed.linear(x[:rows], bias)), rows
    finally:
        KERNELS.use_isa(None)


@pytest.mark.skipif(
    KERNELS is None or "avx512f" not in cpu_kernels.cpu_flags(), reason="this CPU has no AVX-512"
)
@pytest.mark.parametrize("quantized", ["int8-g16", "int8-g64", "int8-g0", "int4-g16", "int4-g32"])
@pytest.mark.parametrize("shape", [(64, 48), (37, 32), (203, 512)])
def test_the_avx512_quantized_kernels_give_the_avx2_kernels_bits(shape, quantized):
    mode, group = quantized.split("-g")
    w = matrix(*shape, torch.float32)
    q = Int8Weight.quantize(w, int(group)) if mode == "int8" else Int4Weight.quantize(w, int(group))
    bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, shape[1], generator=torch.Generator().manual_seed(2))

    def kernel(rows: int) -> torch.Tensor:
        y = torch.empty(rows, shape[0])
        q._kernel(KERNELS, x[:rows].contiguous(), bias, y)  # the tile kernel at any row count
        return y

    try:
        for rows in (1, 2, 3, 4, 5, 12, 13, 64):
            assert KERNELS.use_isa("avx512") == "avx512"
            wide = kernel(rows)
            assert KERNELS.use_isa("avx2") == "avx2"
            assert torch.equal(wide, kernel(rows)), rows
    finally:
        KERNELS.use_isa(None)
