"""Input limits both services enforce the same way."""

from __future__ import annotations

import re

from protos.errors import InvalidArgument

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_session_id(session_id: str) -> None:
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidArgument(
            f"session_id {session_id[:40]!r} must be 1-128 characters of letters, digits and ._:-"
        )
