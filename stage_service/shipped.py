"""A --fetch-weights stage's side of weights over the wire: what the orchestrator offered (its
model's config and fingerprint, the tensors of a range with their hashes), the bytes it streams
into the weights cache, and the TensorSource a load reads from (local files first, the cache
for the rest, each tensor read into memory and verified there). A transfer that stops (cut, or
a cache that cannot be written) says what it kept. No gRPC in here; the servicer converts the
messages.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from protos.errors import FailedPrecondition, InvalidArgument, LlamadistError
from protos.shared.model_files import LlamaArgs, TensorIndex
from protos.shared.submodel import EMBED, layer_of
from protos.shared.transfer import PROGRESS_EVERY_S, progress_text
from stage_service.weight_cache import Entry, OfferAnswer, WeightCache
from stage_service.weights import SAFETENSORS_DTYPES, Blob, TensorSource

log = logging.getLogger(__name__)


@dataclass
class Offer:
    fingerprint: str
    config: dict
    entries: dict[str, Entry]  # by tensor name
    needed_bytes: int  # what the cache lacked when offered
    from_cache: set[str]  # sha256 of entries the cache held at the offer
    needed: dict[str, int]  # sha256 -> size of the entries the cache lacked (wholly or partly)
    had_bytes: int  # what the cache kept of those at the offer (earlier transfers cut short)


def kept_text(n: int) -> str:
    """What a stopped transfer kept, for its error and the stage's log."""
    if not n:
        return "this transfer kept nothing"
    return f"this transfer kept {n} bytes ({n / 1e6:.1f} MB), the next offer resumes from there"


def check_entry(e: Entry) -> None:
    dtype = SAFETENSORS_DTYPES.get(e.dtype)
    if dtype is None:
        raise InvalidArgument(
            f"tensor {e.name}: dtype {e.dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}"
        )
    itemsize = dtype.itemsize
    if any(d < 0 for d in e.shape) or math.prod(e.shape) * itemsize != e.size:
        raise InvalidArgument(
            f"tensor {e.name}: {e.size} bytes do not make a {e.dtype} tensor of shape "
            f"{list(e.shape)}"
        )


class ShippedWeights:
    def __init__(self, cache: WeightCache):
        self.cache = cache
        self.offer: Offer | None = None
        self._lock = threading.Lock()  # one offer or transfer at a time

    def take_offer(self, fingerprint: str, config_json: str, entries: list[Entry]) -> OfferAnswer:
        try:
            config = json.loads(config_json)
            LlamaArgs.from_config(config)
        except (ValueError, KeyError, TypeError, AttributeError, FailedPrecondition) as err:
            raise InvalidArgument(
                f"the offer's config_json is not a Llama config: {err!r}"
            ) from None
        for e in entries:
            check_entry(e)
        with self._lock:
            answer = self.cache.offer(entries)
            needed = {e.sha256: e.size for e in entries if e.sha256 in answer.needs}
            self.offer = Offer(
                fingerprint,
                config,
                {e.name: e for e in entries},
                sum(size - answer.needs[sha] for sha, size in needed.items()),
                {e.sha256 for e in entries if e.sha256 not in answer.needs},
                needed,
                sum(answer.needs.values()),
            )
            log.info(
                "weights offered: %d tensors, %.1f MB; %.1f MB cached, %.1f MB to receive",
                len(entries), sum(e.size for e in entries) / 1e6, answer.cached_bytes / 1e6,
                self.offer.needed_bytes / 1e6,
            )  # fmt: skip
            return answer

    def receive(self, chunks: Iterable[tuple[str, int, bytes]]) -> tuple[int, int]:
        """Writes the chunks into the cache: (bytes written, tensors completed). A stream that
        stops early (a LlamadistError from the chunks or the cache) keeps what the cache could
        write; the error says how much that is, and the next offer resumes from there."""
        with self._lock:
            offer = self.offer
            if offer is None:
                raise FailedPrecondition("no weights were offered: OfferWeights first")
            total, done, completed = offer.needed_bytes, 0, 0
            t0 = last = time.monotonic()
            try:
                for sha, offset, data in chunks:
                    completed += self.cache.write(sha, offset, data)
                    done += len(data)
                    now = time.monotonic()
                    if now - last >= PROGRESS_EVERY_S:
                        last = now
                        log.info("weights: %s", progress_text(done, total, now - t0))
            except LlamadistError as err:
                said = f"{err}; {self._kept(offer)}"
                log.warning("weights: the transfer stopped after %s: %s",
                            progress_text(done, total, time.monotonic() - t0), said)  # fmt: skip
                raise type(err)(said) from None
            else:
                if 0 < done < total:  # grpcio may end a cancelled stream as if it were complete
                    log.warning(
                        "weights: the transfer was cut after %s: the stream ended short of the "
                        "offer; %s", progress_text(done, total, time.monotonic() - t0),
                        self._kept(offer),
                    )  # fmt: skip
            finally:
                self.cache.settle()
                if done:
                    log.info(
                        "weights: received %s, %d tensors completed",
                        progress_text(done, total, time.monotonic() - t0), completed,
                    )  # fmt: skip
            return done, completed

    def _kept(self, offer: Offer) -> str:
        """What a stopped transfer kept. Counted on disk, not from the chunks: a write refused
        halfway kept part of one."""
        self.cache.settle()
        return kept_text(self.cache.held(offer.needed) - offer.had_bytes)

    def source(
        self, local: TensorIndex | None, names_needed: list[str]
    ) -> tuple[TensorSource, list[str]]:
        """The source of a load: local files for the names `local` has, the cache for the rest
        (each must be in the last offer and complete); with the kinds used, wire or cache."""
        offer = self.offer
        blobs: dict[str, Blob] = {}
        kinds = set()
        for name in names_needed:
            if local is not None and local.has(name):
                continue
            entry = offer.entries.get(name) if offer is not None else None
            if entry is None or not self.cache.path(entry.sha256).is_file():
                raise FailedPrecondition(
                    f"tensor {name} is neither in this stage's model directory nor in its "
                    "weights cache: the orchestrator ships a range's tensors (OfferWeights, "
                    "PutWeights) before it assigns the range"
                )
            blobs[name] = Blob(entry.sha256, entry.size, entry.dtype, entry.shape)
            kinds.add("cache" if entry.sha256 in offer.from_cache else "wire")
        source = TensorSource(local, blobs, self.cache.read)
        return source, sorted(kinds, key=["wire", "cache"].index)

    def names_for(self, start: int, end: int, num_layers: int) -> list[str]:
        """The offered tensors a stage serving [start, end) reads."""
        offer = self.offer
        if offer is None:
            return []
        out = []
        for name in offer.entries:
            if (layer := layer_of(name)) is not None:
                if start <= layer < end:
                    out.append(name)
            elif name == EMBED:
                out += [name] if start == 0 or end == num_layers else []  # or the tied head
            elif end == num_layers:
                out.append(name)  # the final norm and the head
        return out
