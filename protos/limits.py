"""Input limits both services enforce the same way."""

from __future__ import annotations

import re
from collections.abc import Iterator

from protos.errors import InvalidArgument

DEFAULT_MAX_NEW_TOKENS = 128  # a request that names no max_new_tokens (client, CLI, server)
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

MAX_MESSAGE_BYTES = 256 * 2**20  # gRPC's send/receive limit on every llamadist channel
# What the steps of one StepBatch (or the replies of one StepBatchReply message) may add up to:
# the rest is room for the message's own framing.
MAX_BATCH_BYTES = MAX_MESSAGE_BYTES - 2**20
MAX_DRAFT_TOKENS = 16  # drafted tokens one speculative step may verify (StepRequest.draft_tokens)


def check_session_id(session_id: str) -> None:
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidArgument(
            f"session_id {session_id[:40]!r} must be 1-128 characters of letters, digits and ._:-"
        )


def split_by_size(items: list, max_bytes: int) -> Iterator[list]:
    """`items` (protobuf messages) in order, as groups whose serialized sizes add up to at most
    `max_bytes` (a lone item over it is a group of its own: the caller refused those)."""
    group: list = []
    size = 0
    for item in items:
        n = item.ByteSize() + 8  # + the field's tag and length prefix
        if group and size + n > max_bytes:
            yield group
            group, size = [], 0
        group.append(item)
        size += n
    if group:
        yield group
