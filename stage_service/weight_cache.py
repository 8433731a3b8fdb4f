"""The stage's content-addressed weights cache (--fetch-weights, --weights-cache DIR): one file
per tensor, named by the sha256 of its bytes, so a restart, a replica rejoining or a reload back
to a range held before finds its tensors and transfers nothing. No torch, no gRPC in here.

    DIR/blobs/<sha256>     complete entries, verified against their name when they completed
                           and again when an offer names them (a corrupted one is dropped)
    DIR/partial/<sha256>   a transfer cut short: its bytes so far, resumed from its length

One stage process uses a cache directory at a time (a lock file says which); a second is
refused at start. The cache holds at most `limit_bytes`: a new transfer first evicts the least
recently used entries that the offer in progress does not need. A range larger than the limit
is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from protos.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from protos.transfer import file_digest

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    return file_digest(path).hexdigest()


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class Entry:
    """One tensor of an offer."""

    name: str
    sha256: str
    size: int
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, F16


@dataclass
class OfferAnswer:
    needs: dict[str, int]  # sha256 -> bytes the cache kept of it already
    cached_bytes: int  # bytes of the offer complete and verified in the cache
    discarded_bytes: int  # corrupted entries dropped (now in needs)


class WeightCache:
    def __init__(self, root: Path, limit_bytes: int):
        self.root = Path(root)
        self.limit_bytes = limit_bytes
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        for d in (self.blobs, self.partial):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / "lock", "w")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise FailedPrecondition(
                f"the weights cache {self.root} is in use by another stage process: give each "
                "stage on a host its own --weights-cache"
            ) from None
        self._lock = threading.Lock()
        self._expected: dict[str, int] = {}  # the offer in progress: sha256 -> size
        # Entries verified, with the (size, mtime, inode) they had then, kept in verified.json
        # so that a restart does not hash its whole range again: a file changed since (its
        # stat differs) is hashed again before use.
        self._stamps = self.root / "verified.json"
        self._verified: dict[str, tuple[int, ...]] = self._read_stamps()
        self._writing: dict[str, _Partial] = {}  # entries a stream is appending to

    def close(self) -> None:
        """Lets another process use the directory (a process's exit does this too)."""
        self._lock_file.close()

    # ------------------------------------------------------------------ reading

    def path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def _stat_key(self, path: Path) -> tuple[int, ...]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns, st.st_ino

    def _read_stamps(self) -> dict[str, tuple[int, ...]]:
        try:
            return {k: tuple(v) for k, v in json.loads(self._stamps.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_stamps(self) -> None:
        tmp = self._stamps.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._verified))
        os.replace(tmp, self._stamps)

    def verified(self, sha256: str, size: int) -> bool:
        """Whether the complete entry exists with `size` bytes whose hash is its name (hashed
        once per file version, see _stamps). A corrupted entry is deleted."""
        path = self.path(sha256)
        try:
            key = self._stat_key(path)
        except FileNotFoundError:
            return False
        if self._verified.get(sha256) == key:
            return True
        if key[0] == size and file_sha256(path) == sha256:
            self._verified[sha256] = key
            return True
        log.warning("weights cache: %s is corrupted (its bytes do not hash to its name); dropped",
                    path)  # fmt: skip
        path.unlink(missing_ok=True)
        self._verified.pop(sha256, None)
        return False

    def touch(self, sha256: str) -> None:
        """Marks an entry used now (eviction takes the least recently used first)."""
        path = self.path(sha256)
        if path.exists():
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))

    # ------------------------------------------------------------------ an offer

    def offer(self, entries: list[Entry]) -> OfferAnswer:
        """What the cache lacks of `entries`; makes room for it (LRU eviction of entries the
        offer does not name) or refuses an offer larger than the limit."""
        for e in entries:
            if not _is_sha256(e.sha256):
                raise InvalidArgument(f"tensor {e.name}: {e.sha256!r} is not a sha256 hex digest")
        self.settle()  # what an earlier stream wrote is on disk, its length the resume point
        unique = {e.sha256: e.size for e in entries}
        total = sum(unique.values())
        if total > self.limit_bytes:
            raise ResourceExhausted(
                f"the range's tensors take {total / 2**20:.0f} MiB, more than the weights cache "
                f"may hold (--weights-cache-mb {self.limit_bytes // 2**20}): raise it"
            )
        with self._lock:
            needs, cached, discarded = {}, 0, 0
            for sha, size in unique.items():
                had = self.path(sha).exists()
                if self.verified(sha, size):
                    cached += size
                    self.touch(sha)
                    continue
                discarded += size if had else 0
                part = self.partial / sha
                have = part.stat().st_size if part.exists() else 0
                if have > size:  # not ours to resume
                    part.unlink()
                    have = 0
                needs[sha] = have
            self._expected = unique
            self._evict(keep=set(unique), incoming=sum(unique[s] - h for s, h in needs.items()))
            self._save_stamps()
            return OfferAnswer(needs, cached, discarded)

    def _used_bytes(self) -> int:
        return sum(p.stat().st_size for d in (self.blobs, self.partial) for p in d.iterdir())

    def _evict(self, keep: set[str], incoming: int) -> None:
        over = self._used_bytes() + incoming - self.limit_bytes
        if over <= 0:
            return
        candidates = [p for d in (self.partial, self.blobs) for p in d.iterdir()]
        candidates = sorted((p for p in candidates if p.name not in keep), key=_atime)
        for path in candidates:
            if over <= 0:
                break
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            self._verified.pop(path.name, None)
            over -= size
            log.info("weights cache: evicted %s (%d bytes) to stay under the limit", path, size)

    # ------------------------------------------------------------------ receiving

    def write(self, sha256: str, offset: int, data: bytes) -> bool:
        """Appends a chunk of an offered entry at `offset` (where the entry's kept bytes end);
        True when the entry is complete, verified and in the cache. A complete entry whose hash
        differs is dropped (the sender's bytes were not what it offered) and refused, so the
        next offer asks for all of it again. Call `settle()` when the stream ends."""
        with self._lock:
            size = self._expected.get(sha256)
            if size is None:
                raise InvalidArgument(
                    f"tensor {sha256[:12]}... is not in the last offer: OfferWeights first"
                )
            part = self._writing.get(sha256) or self._resume(sha256)
            if offset != part.have:
                raise InvalidArgument(
                    f"tensor {sha256[:12]}...: chunk at offset {offset}, but the stage holds "
                    f"{part.have} bytes of it; send from there"
                )
            if part.have + len(data) > size:
                raise InvalidArgument(
                    f"tensor {sha256[:12]}...: {part.have + len(data)} bytes sent, it has {size}"
                )
            part.file.write(data)
            part.digest.update(data)
            part.have += len(data)
            if part.have < size:
                return False
            del self._writing[sha256]
            part.file.close()
            path = self.partial / sha256
            if part.digest.hexdigest() != sha256:
                path.unlink()
                raise FailedPrecondition(
                    f"tensor {sha256[:12]}...: the bytes received do not hash to the digest "
                    "offered; dropped (the next reload sends it again)"
                )
            os.replace(path, self.path(sha256))
            self._verified[sha256] = self._stat_key(self.path(sha256))
            return True

    def _resume(self, sha256: str) -> _Partial:
        """Opens an entry's partial file for appending, its digest over what it kept."""
        path = self.partial / sha256
        have = path.stat().st_size if path.exists() else 0
        digest = file_digest(path) if have else hashlib.sha256()
        part = _Partial(open(path, "ab"), digest, have)  # noqa: SIM115 - closed when complete
        self._writing[sha256] = part
        return part

    def settle(self) -> None:
        """A stream ended: what it wrote of unfinished entries is on disk, to resume from."""
        with self._lock:
            for part in self._writing.values():
                part.file.close()
            self._writing.clear()
            self._save_stamps()


@dataclass
class _Partial:
    file: typing.BinaryIO
    digest: typing.Any  # hashlib's sha256 object
    have: int


def _atime(path: Path) -> int:
    try:
        return path.stat().st_atime_ns
    except FileNotFoundError:
        return 0
