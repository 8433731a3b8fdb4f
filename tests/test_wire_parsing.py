"""Bytes that are not a valid message get INVALID_ARGUMENT (never INTERNAL), on both services."""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import in_process_mesh, keyed_channel, make_tiny_model

NOT_A_MESSAGE = b"\xff\xff\xff\xff"  # field 0x1fffff... wire type 7: invalid


@pytest.mark.parametrize(
    "service, method",
    [
        ("Stage", "Forward"),
        ("Stage", "Info"),
        ("Orchestrator", "Generate"),
        ("Orchestrator", "GenerateStream"),
        ("Orchestrator", "ReloadPlan"),
    ],
)
def test_garbage_bytes_are_invalid_argument(tmp_path, service, method):
    with in_process_mesh(make_tiny_model(tmp_path, "gqa"), 1) as mesh:
        address = mesh.addresses[0] if service == "Stage" else mesh.address
        # a stage refuses a caller without the stage key before reading its bytes: send it
        opened = keyed_channel(address) if service == "Stage" else grpc.insecure_channel(address)
        with opened as channel:
            path = f"/llamadist.{service}/{method}"
            if method == "GenerateStream":
                call = channel.unary_stream(path)
                with pytest.raises(grpc.RpcError) as err:
                    list(call(NOT_A_MESSAGE, timeout=10))
            else:
                call = channel.unary_unary(path)
                with pytest.raises(grpc.RpcError) as err:
                    call(NOT_A_MESSAGE, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "not a valid llamadist." in err.value.details()
        assert mesh.client.generate(token_ids=[1, 2], max_new_tokens=3).token_ids
