"""The orchestrator's side of weights over the wire: a stage started with --fetch-weights that
lacks layers of its planned range gets their tensors from the orchestrator's model directory.

For each such stage: a manifest of the range's tensors it lacks (name, shape, dtype, sha256 of
the bytes), `OfferWeights` (the stage answers what its cache lacks, with what it kept of a
transfer cut short), then `PutWeights` streams exactly that in chunks under the message limit,
and the stage verifies each tensor against its hash. Reloads call this before they pause
serving, so the stage serves its old range until the new one is complete. Hashes are computed
once per tensor and kept beside the orchestrator's other caches, keyed by the file's size and
mtime. No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos import llamadist_pb2 as pb
from protos.errors import LlamadistError, Unavailable
from protos.shared.model_files import LlamaArgs, read_config, safetensors_files, safetensors_header
from protos.shared.submodel import head_tensor, range_tensors
from protos.shared.transfer import PROGRESS_EVERY_S, file_digest, progress_text
from protos.status import from_rpc_error

log = logging.getLogger(__name__)

CHUNK_BYTES = 2**20  # 4 MiB measured slower here: each message is several fresh buffers


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes are in the orchestrator's safetensors."""

    path: Path
    offset: int  # from the file's start
    size: int
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Transfer:
    """One stage's transfer, as ListStages and the log show it."""

    total: int
    done: int = 0
    started: float = 0.0

    def text(self) -> str:
        return progress_text(self.done, self.total, time.monotonic() - self.started)


@dataclass(frozen=True)
class Shipped:
    sent_bytes: int
    cached_bytes: int  # the stage's cache had these already
    seconds: float


def default_hash_cache() -> Path:
    return Path.home() / ".cache" / "llamadist" / "hashes"


class WeightShipper:
    def __init__(self, model_dir: Path, fingerprint: str, hash_cache: Path | None = None):
        self.model_dir = Path(model_dir)
        self.fingerprint = fingerprint
        self.config_json = json.dumps(read_config(self.model_dir))
        self.args = LlamaArgs.from_config(read_config(self.model_dir))
        self.stored: dict[str, Stored] = {}
        for path in safetensors_files(self.model_dir):
            header = safetensors_header(path)
            base = 8 + len(header)
            for name, meta in json.loads(header).items():
                if name == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                self.stored[name] = Stored(
                    path, base + begin, end - begin, tuple(meta["shape"]), meta["dtype"]
                )
        self._hash_file = (hash_cache or default_hash_cache()) / f"{fingerprint}.json"
        self._hashes = self._read_hashes()
        self._hash_lock = threading.Lock()
        self.transfers: dict[str, Transfer] = {}  # by stage address, while one runs

    # ------------------------------------------------------------------ hashes

    @staticmethod
    def _version(stored: Stored) -> str:
        st = stored.path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"

    def _read_hashes(self) -> dict:
        try:
            return json.loads(self._hash_file.read_text())
        except (OSError, ValueError):
            return {}

    def sha256(self, name: str) -> str:
        stored = self.stored[name]
        version = self._version(stored)
        with self._hash_lock:
            known = self._hashes.get(name)
            if known is not None and known[0] == version:
                return known[1]
            hexdigest = file_digest(stored.path, stored.offset, stored.size).hexdigest()
            self._hashes[name] = [version, hexdigest]
            return hexdigest

    def _save_hashes(self) -> None:
        # a temporary name of its own: threads shipping to several stages at once, and other
        # orchestrators of this home, save the same file
        tmp = self._hash_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self._hash_file.parent.mkdir(parents=True, exist_ok=True)
            with self._hash_lock:
                tmp.write_text(json.dumps(self._hashes))
            os.replace(tmp, self._hash_file)
        except OSError as err:  # a read-only home: hashes are recomputed next time
            log.warning("cannot keep tensor hashes in %s: %s", self._hash_file, err)

    # ------------------------------------------------------------------ what a stage lacks

    def lacking(self, start: int, end: int, info: pb.StageInfo) -> list[str]:
        """The tensors of [start, end) that a stage's model directory does not hold."""
        num_layers, head = self.args.num_layers, head_tensor(self.args, self)
        names = set(range_tensors(self, start, end, num_layers, head))
        if info.held_layer_end > info.held_layer_start:
            held = range_tensors(self, info.held_layer_start, info.held_layer_end, num_layers, head)
            names -= set(held)
        return sorted(names)

    # TensorIndex's interface, which range_tensors and head_tensor read
    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s.shape for n, s in self.stored.items()}

    def has(self, name: str) -> bool:
        return name in self.stored

    def lacking_bytes(self, start: int, end: int, info: pb.StageInfo) -> int:
        return sum(self.stored[n].size for n in self.lacking(start, end, info))

    def manifest(self, names: list[str]) -> pb.WeightManifest:
        tensors = []
        for name in names:
            s = self.stored[name]
            tensors.append(
                pb.WeightEntry(
                    name=name, sha256=self.sha256(name), size_bytes=s.size, shape=s.shape,
                    dtype=s.dtype,
                )
            )  # fmt: skip
        self._save_hashes()
        return pb.WeightManifest(
            model_fingerprint=self.fingerprint, config_json=self.config_json, tensors=tensors
        )

    # ------------------------------------------------------------------ shipping

    def ship(self, stub, name: str, address: str, start: int, end: int, info) -> Shipped | None:
        """Makes sure the stage at `address` (`stub` its Stage stub, `name` for messages) has
        every tensor of [start, end) it lacks; None when it lacks none or does not fetch."""
        if not info.fetches_weights:
            return None
        names = self.lacking(start, end, info)
        if not names:
            return None
        t0 = time.monotonic()
        manifest = self.manifest(names)
        by_sha = {t.sha256: self.stored[t.name] for t in manifest.tensors}
        try:
            needs = stub.OfferWeights(manifest, timeout=600)
        except grpc.RpcError as err:
            raise from_rpc_error(err, name) from None
        total = sum(by_sha[n.sha256].size - n.have_bytes for n in needs.needs)
        if needs.discarded_bytes:
            log.warning(
                "%s: its weights cache held %.1f MB of corrupted tensors; sending them again",
                name, needs.discarded_bytes / 1e6,
            )  # fmt: skip
        if total:
            transfer = Transfer(total, started=time.monotonic())
            self.transfers[address] = transfer
            log.info("%s: sending %.1f MB of weights (layers %d-%d)", name, total / 1e6, start,
                     end - 1)  # fmt: skip
            try:
                reply = stub.PutWeights(self._chunks(needs.needs, by_sha, transfer, name))
            except grpc.RpcError as err:
                error = from_rpc_error(err, name)
                raise type(error)(
                    f"{error}; {transfer.done / 1e6:.1f} of {total / 1e6:.1f} MB were sent: the "
                    "next reload resumes from there, from what the stage kept of them"
                ) from None
            finally:
                self.transfers.pop(address, None)
            if reply.bytes != total:
                raise Unavailable(f"{name} took {reply.bytes} of {total} bytes of weights")
        shipped = Shipped(total, needs.cached_bytes, time.monotonic() - t0)
        log.info(
            "%s: weights ready: %.1f MB sent, %.1f MB from its cache, %.2f s",
            name, shipped.sent_bytes / 1e6, shipped.cached_bytes / 1e6, shipped.seconds,
        )  # fmt: skip
        return shipped

    def _chunks(self, needs, by_sha: dict[str, Stored], transfer: Transfer, name: str):
        last = time.monotonic()
        for need in needs:
            stored = by_sha[need.sha256]
            offset = need.have_bytes
            with open(stored.path, "rb") as f:
                f.seek(stored.offset + offset)
                while offset < stored.size:
                    data = f.read(min(CHUNK_BYTES, stored.size - offset))
                    if not data:
                        raise LlamadistError(f"{stored.path} ends inside a tensor")
                    yield pb.WeightChunk(sha256=need.sha256, offset=offset, data=data)
                    offset += len(data)
                    transfer.done += len(data)
                    if time.monotonic() - last >= PROGRESS_EVERY_S:
                        last = time.monotonic()
                        log.info("%s: weights %s", name, transfer.text())
