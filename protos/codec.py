"""The one tensor codec: torch tensor <-> `Tensor` message (raw little-endian row-major bytes).

Only stages decode hidden states; the orchestrator passes the messages through untouched.
"""

from __future__ import annotations

import sys

import torch

from protos import llamadist_pb2 as pb
from protos.errors import InvalidArgument

TORCH_DTYPES: dict[int, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.BFLOAT16: torch.bfloat16,
    pb.FLOAT16: torch.float16,
}
WIRE_DTYPES: dict[torch.dtype, int] = {v: k for k, v in TORCH_DTYPES.items()}
# float32, bfloat16, float16: the names --dtype and Info use (stage_service.config.DTYPES)
DTYPE_NAMES: dict[str, torch.dtype] = {pb.DType.Name(k).lower(): v for k, v in TORCH_DTYPES.items()}

assert sys.byteorder == "little", "the wire format is little-endian"

MAX_DIMS = 8
MAX_DIM = 2**31 - 1


def to_pb(tensor: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """The tensor as a message: a new one, or written into `out` (a field of a message being
    made: no copy of the bytes from a temporary)."""
    if tensor.dtype not in WIRE_DTYPES:
        raise InvalidArgument(
            f"dtype {tensor.dtype} cannot be sent; use one of {list(DTYPE_NAMES)}"
        )
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    if out is None:
        return pb.Tensor(data=data, shape=list(tensor.shape), dtype=WIRE_DTYPES[tensor.dtype])
    out.data, out.dtype = data, WIRE_DTYPES[tensor.dtype]
    out.shape[:] = tensor.shape
    return out


def from_pb(msg: pb.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decodes and checks that the byte length matches shape and dtype."""
    if msg.dtype not in TORCH_DTYPES:
        raise InvalidArgument(f"tensor dtype {msg.dtype} is not one of {list(DTYPE_NAMES)}")
    if len(msg.shape) > MAX_DIMS or any(not 0 <= d <= MAX_DIM for d in msg.shape):
        raise InvalidArgument(
            f"tensor shape {list(msg.shape)[: MAX_DIMS + 1]} must have at most {MAX_DIMS} "
            f"dimensions, each in [0, {MAX_DIM}]"
        )
    dtype = TORCH_DTYPES[msg.dtype]
    numel = 1
    for d in msg.shape:
        numel *= d
    itemsize = dtype.itemsize
    if len(msg.data) != numel * itemsize:
        raise InvalidArgument(
            f"tensor of shape {list(msg.shape)} and dtype {dtype} needs {numel * itemsize} bytes, "
            f"got {len(msg.data)}"
        )
    if numel == 0:
        return torch.empty(tuple(msg.shape), dtype=dtype, device=device)
    # One copy into a writable buffer (torch refuses read-only bytes), read in place as `dtype`.
    tensor = torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(tuple(msg.shape))
    return tensor if device == "cpu" else tensor.to(device)
