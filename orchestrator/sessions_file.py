"""Suspended sessions on disk: what an orchestrator that shuts down saves (`--sessions-file`) so
that, once it is back, clients resume their generations by session id.

A session is its request (prompt ids, limits, sampling, stop strings), its owner and what it
generated so far; seeded sampling draws each token from (seed, position), so a resumed session
continues exactly where it stopped. The file is JSON, written atomically, and read once at start
(then removed: a session resumes once).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from google.protobuf import json_format

from orchestrator.session_state import GenerationRequest, SessionState
from protos import llamadist_pb2 as pb

log = logging.getLogger(__name__)
VERSION = 1


class SessionsFile:
    def __init__(self, path: str):
        self.path = Path(path)

    def save(self, sessions: dict[str, SessionState]) -> None:
        now = time.monotonic()
        rows = [
            {
                "session_id": sid,
                "owner": state.owner,
                "prompt_ids": state.req.prompt_ids,
                "max_new_tokens": state.req.max_new_tokens,
                "sampling": json_format.MessageToDict(state.req.sampling),
                "stop": list(state.req.stop),
                "ignore_eos": state.req.ignore_eos,
                "speculate": state.req.speculate,
                "generated": state.generated,
                "logprobs": state.logprobs,
                "suspended_s_ago": now - state.suspended_at,
            }
            for sid, state in sessions.items()
        ]
        body = json.dumps({"version": VERSION, "saved_at": time.time(), "sessions": rows})
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(body)
        os.replace(tmp, self.path)
        log.info("saved %d suspended sessions to %s", len(rows), self.path)

    def load(self, ttl_s: float) -> dict[str, SessionState]:
        """The sessions saved by the last shutdown that are younger than `ttl_s`; the file is
        removed once read. A missing file is no sessions; an unreadable one is logged."""
        try:
            data = json.loads(self.path.read_text())
            self.path.unlink()
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.error("cannot read the sessions file %s (%s); starting without it", self.path, err)
            return {}
        away_s = max(0.0, time.time() - float(data.get("saved_at", 0)))
        now = time.monotonic()
        sessions = {}
        for row in data.get("sessions", []):
            age = row["suspended_s_ago"] + away_s
            if data.get("version") != VERSION or age > ttl_s:
                continue
            req = GenerationRequest(
                prompt_ids=row["prompt_ids"],
                max_new_tokens=row["max_new_tokens"],
                sampling=json_format.ParseDict(row["sampling"], pb.SamplingParams()),
                stop=tuple(row["stop"]),
                ignore_eos=row["ignore_eos"],
                session_id=row["session_id"],
                speculate=row.get("speculate", ""),  # files saved before it: the default
            )
            sessions[req.session_id] = SessionState(
                req, row["owner"], row["generated"], row["logprobs"], now - age
            )
        log.info("loaded %d suspended sessions from %s", len(sessions), self.path)
        return sessions
