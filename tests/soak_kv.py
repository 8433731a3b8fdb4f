"""The soak's checks of the stages' KV caches (tests/soak.py): back to zero after the run, and
with static slots every slot back in the pool, which kv_used_bytes (the sessions a stage holds)
cannot show."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import grpc

from protos import llamadist_pb2 as pb
from protos.shared.stage_auth import stage_channel

# a stage dtype name -> (its wire enum, bytes per value)
DTYPE_BYTES = {"float32": (pb.FLOAT32, 4), "bfloat16": (pb.BFLOAT16, 2), "float16": (pb.FLOAT16, 2)}


def stage_infos(addresses: list[str], key: str | None) -> list[pb.StageInfo]:
    """Each stage's Info, asked with the mesh's stage key (`key`; None: an open stage)."""
    infos = []
    for address in addresses:
        with stage_channel(address, key=key) as channel:
            raw = channel.unary_unary("/llamadist.Stage/Info")(b"", timeout=10)
            infos.append(pb.StageInfo.FromString(raw))
    return infos


def caches_back_to_zero(
    stages: list[str], key: str | None, wait_s: float = 5.0
) -> tuple[list[pb.StageInfo], str | None]:
    """Polls every stage's Info until kv_used_bytes and active_sessions are 0 (caches are freed
    as the last replies go out: a moment); the last Infos, and a failure when not in time."""
    deadline = time.monotonic() + wait_s
    while True:
        infos = stage_infos(stages, key)
        if all(i.kv_used_bytes == 0 and i.active_sessions == 0 for i in infos):
            return infos, None
        if time.monotonic() > deadline:
            return infos, "KV cache not back to zero: " + ", ".join(
                f"{a} kv_used_bytes={i.kv_used_bytes} active_sessions={i.active_sessions}"
                for a, i in zip(stages, infos, strict=True)
            )
        time.sleep(0.2)


def static_slot_args(model: Path, slots: int, stage_args: list[str]) -> list[str]:
    """Stage options for static KV slots with a budget of about `slots` slots on each of the two
    stages (the larger layer share of a uniform plan sets the size of a slot)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-context", type=int, default=0)
    p.add_argument("--dtype", default="")
    p.add_argument("--device", default="cpu")
    known, _ = p.parse_known_args(stage_args)
    config = json.loads((model / "config.json").read_text())
    context = min(known.max_context or 2**62, config["max_position_embeddings"])
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    dtype = known.dtype or ("float32" if known.device == "cpu" else "bfloat16")
    layers = -(-config["num_hidden_layers"] // 2)
    per_token = 2 * layers * config.get("num_key_value_heads", heads) * head_dim
    per_slot = per_token * DTYPE_BYTES[dtype][1] * context
    return [
        "--static-kv",
        "on",
        "--batch-invariant",
        "off",
        "--kv-cache-mb",
        str(-(-slots * per_slot // 2**20)),
    ]


def probe_slots(address: str, hidden_size: int, key: str | None) -> str | None:
    """Takes every static slot of the stage at `address` with one-token sessions of its own,
    one more must be refused, then ends them. None when so, else what the stage lacks."""
    info = stage_infos([address], key)[0]
    slots = info.kv_budget_bytes // (info.max_context * info.kv_bytes_per_token)
    wire_dtype, itemsize = DTYPE_BYTES[info.dtype]
    hidden = pb.Tensor(data=bytes(hidden_size * itemsize), shape=[1, hidden_size], dtype=wire_dtype)
    taken, refusal = [], "none"
    with stage_channel(address, key=key) as channel:
        forward = channel.unary_unary(
            "/llamadist.Stage/Forward",
            request_serializer=pb.StepRequest.SerializeToString,
            response_deserializer=pb.StepReply.FromString,
        )
        end = channel.unary_unary(
            "/llamadist.Stage/EndSession",
            request_serializer=pb.EndSessionRequest.SerializeToString,
            response_deserializer=pb.EndSessionReply.FromString,
        )
        for i in range(slots + 1):
            step = pb.StepRequest(
                session_id=f"soak-slot-probe-{i}", plan_epoch=info.plan_epoch, token_ids=[0]
            )
            if not info.has_embeddings:
                step.hidden.CopyFrom(hidden)
            try:
                forward(step, timeout=30)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refusal = err.details()
                break
            taken.append(step.session_id)
        for session_id in taken:
            end(pb.EndSessionRequest(session_id=session_id), timeout=30)
    if len(taken) < slots:
        return (
            f"stage {address}: {slots - len(taken)} of its {slots} KV slots never came back "
            f"(probe sessions took {len(taken)}, then: {refusal})"
        )
    if len(taken) > slots:
        return (
            f"stage {address}: took {len(taken)} probe sessions, more than the {slots} slots "
            "of its Info: are its sessions in static slots (--static-kv on)?"
        )
    print(f"stage {address}: all {slots} KV slots free")
    return None
