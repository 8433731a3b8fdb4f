"""What both ends of weights over the wire share (no torch): hashing files, or part of one, the
way the orchestrator names a tensor and the stage checks it, and the progress line both log
(every PROGRESS_EVERY_S)."""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_BLOCK = 8 * 2**20
PROGRESS_EVERY_S = 2.0  # between two progress lines of one transfer


def file_digest(path: Path, offset: int = 0, size: int | None = None):
    """A sha256 object over `size` bytes of `path` from `offset` (None: to the end); more may be
    fed to it. OSError when the file ends first."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left is None or left > 0:
            block = f.read(HASH_BLOCK if left is None else min(HASH_BLOCK, left))
            if not block:
                if left is None:
                    break
                raise OSError(f"{path} ends {left} bytes before the {size} asked from {offset}")
            digest.update(block)
            left = None if left is None else left - len(block)
    return digest


def progress_text(done: int, total: int, seconds: float) -> str:
    """'312.0 of 540.0 MB, 410 MB/s, ETA 0.6 s'."""
    rate = done / seconds if seconds > 0 else 0.0
    eta = f"ETA {(total - done) / rate:.1f} s" if rate > 0 else "ETA unknown"
    return f"{done / 1e6:.1f} of {total / 1e6:.1f} MB, {rate / 1e6:.0f} MB/s, {eta}"
