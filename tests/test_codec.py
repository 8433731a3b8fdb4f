import pytest
import torch

from protos import codec
from protos import llamadist_pb2 as pb
from protos.errors import InvalidArgument


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (1, 576), (0, 4), (2, 3, 4)])
def test_round_trip_is_bit_exact(dtype, shape):
    t = torch.randn(shape).to(dtype)
    back = codec.from_pb(codec.to_pb(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(
        back.view(-1).view(torch.uint8) if back.numel() else back,
        t.view(-1).view(torch.uint8) if t.numel() else t,
    )


def test_non_contiguous_input_is_serialized_in_logical_order():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(codec.from_pb(codec.to_pb(t)), t)


def test_wire_bytes_are_little_endian_row_major():
    msg = codec.to_pb(torch.tensor([[1.0, 2.0]]))
    assert msg.data == b"\x00\x00\x80\x3f\x00\x00\x00\x40"
    assert list(msg.shape) == [1, 2] and msg.dtype == pb.FLOAT32


@pytest.mark.parametrize(
    "msg, needle",
    [
        (pb.Tensor(data=b"\x00" * 7, shape=[2], dtype=pb.FLOAT32), "needs 8 bytes, got 7"),
        (pb.Tensor(data=b"", shape=[1], dtype=pb.DTYPE_UNSPECIFIED), "dtype"),
        (pb.Tensor(data=b"", shape=[-1, 2], dtype=pb.FLOAT32), "each in"),
        (pb.Tensor(data=b"", shape=[2**63 - 1, 348, 0, 6], dtype=pb.FLOAT32), "each in"),
        (pb.Tensor(data=b"", shape=[1] * 9, dtype=pb.FLOAT32), "at most 8"),
        (pb.Tensor(data=b"\x00" * 4, shape=[], dtype=pb.FLOAT16), "needs 2 bytes"),
    ],
)
def test_bad_tensors_are_refused_with_a_reason(msg, needle):
    with pytest.raises(InvalidArgument, match=needle):
        codec.from_pb(msg)


def test_unsendable_dtype_is_refused():
    with pytest.raises(InvalidArgument, match="cannot be sent"):
        codec.to_pb(torch.zeros(2, dtype=torch.int64))
