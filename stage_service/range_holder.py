"""The layer range a stage holds and the plan epoch it holds it under: loading and dropping
it, where its weights come from (the model directory, a submodel, the weights the orchestrator
ships), and what Info reports of it. No gRPC in here.

A stage starts with no layers; the orchestrator assigns a range with `load_layers`, tagged with
the plan epoch that every step must then carry.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from protos.errors import FailedPrecondition, InvalidArgument
from protos.shared.layer_range import LayerRange
from protos.shared.model_files import TensorIndex, read_config
from protos.shared.submodel import Held, describe, held, layer_of
from stage_service.config import StageConfig
from stage_service.decode import StaticDecoder
from stage_service.device_checks import check_device
from stage_service.fused_layers import range_model
from stage_service.kv_cache import CacheShape, SessionCache, check_slot_budget
from stage_service.model import LlamaArgs, RangeModel
from stage_service.shipped import ShippedWeights
from stage_service.speed import measure_gflops
from stage_service.weight_cache import Entry, OfferAnswer, WeightCache
from stage_service.weights import Quantization, TensorSource, load_range, weight_bytes

log = logging.getLogger(__name__)

# How far a new plan epoch may jump: orchestrators count plans one by one, so a far larger jump
# is a stray message, which would leave no epoch for later plans to go above.
MAX_EPOCH_JUMP = 2**32


@dataclass
class LoadedRange:
    """The range in force: its model, its sessions' caches, and the epoch it was loaded under."""

    model: RangeModel
    cache: SessionCache
    weight_bytes: int
    epoch: int
    decoder: StaticDecoder | None = None  # static KV: decode steps of one token per session


def release_freed_memory() -> None:
    """Hands memory freed inside the heap back to the system (glibc's malloc_trim): loading a
    quantized range frees a float copy of every matrix, which the allocator would otherwise
    keep in the process's RSS."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RangeHolder:
    def __init__(self, config: StageConfig):
        self.config = config
        # No model directory (--fetch-weights): the model's config comes with the first offer.
        self.model_dir = Path(config.model) if config.model else None
        self.args: LlamaArgs | None = None
        self.held = Held(LayerRange(0, 0), 0, "")  # the layers the model directory holds
        if self.model_dir is not None:
            self.args = LlamaArgs.from_config(read_config(self.model_dir))
            self.held = held(self.model_dir)  # all layers, or a submodel's range (checked)
        self.fingerprint = self.held.fingerprint
        self.shipped: ShippedWeights | None = None
        if config.fetch_weights:
            cache = WeightCache(Path(config.weights_cache), config.weights_cache_mb * 2**20)
            self.shipped = ShippedWeights(cache)
        self.weights_source = ""  # of the range in force: local, submodel, wire, cache
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        check_device(config, self.device, self.dtype)
        self.loaded: LoadedRange | None = None
        self.gflops = measure_gflops(self.device, self.dtype)
        # The range in force changes, and batches run on it, holding this lock: one batch at a
        # time (torch already uses the stage's threads inside each op), no load under a batch.
        self.compute_lock = threading.Lock()
        self._admin = threading.Lock()  # one layer assignment at a time
        self.epoch = 0  # the plan epoch of the assignment in force (0: none yet)
        self.peers: frozenset[str] = frozenset()  # its plan's stage addresses (forwarding)

    # ------------------------------------------------------------------ assignments

    def _check_epoch(self, epoch: int, same_as_in_force: bool) -> bool:
        """Whether an assignment under `epoch` is to be carried out: it must come from a newer
        plan than the one in force; the same epoch is a retry, a no-op when it asks for what is
        in force already. Anything else (a stray or replayed message) is refused."""
        if epoch == self.epoch and same_as_in_force:
            return False
        if epoch > self.epoch + MAX_EPOCH_JUMP:
            raise InvalidArgument(
                f"plan epoch {epoch} is implausibly far past the epoch in force ({self.epoch}); "
                "an orchestrator's epochs grow by one per plan"
            )
        if epoch <= self.epoch:
            raise FailedPrecondition(
                f"plan epoch {epoch} is not newer than the epoch in force ({self.epoch}); "
                "layer assignments come from the orchestrator's plan reloads"
            )
        return True

    def drop_layers(self, epoch: int) -> None:
        """Holds nothing from plan `epoch` on (frees the range and every cached session)."""
        with self._admin:
            if not self._check_epoch(epoch, self.loaded is None):
                return
            with self.compute_lock:
                self._release(epoch)

    def _release(self, epoch: int) -> None:
        """Drops the range in force (and every cached session); `epoch` is in force from now,
        even if a load that follows fails. Call holding the compute lock."""
        if self.loaded is not None and self.loaded.decoder is not None:
            gc.unfreeze()  # the old range's objects become collectable again (see _load)
        self.loaded = None
        self.epoch = epoch
        self.peers = frozenset()

    def load_layers(
        self, start: int, end: int, epoch: int, peers: frozenset[str] = frozenset()
    ) -> None:
        """Loads [start, end) under plan `epoch` and drops the old range with every cached
        session (see _check_epoch for which epochs are taken). `peers`: the plan's stage
        addresses, the only ones this stage forwards steps to (part of the assignment)."""
        if self.args is None:
            raise FailedPrecondition(
                "this stage has no model directory and no weights were offered yet: the "
                "orchestrator offers them (OfferWeights) before it assigns layers"
            )
        if not 0 <= start < end <= self.args.num_layers:
            raise InvalidArgument(
                f"layer range [{start}, {end}) is not inside the model's "
                f"{self.args.num_layers} layers (to hold nothing, ask for that explicitly)"
            )
        missing = self.held.missing(start, end)
        if missing and self.shipped is None:
            raise FailedPrecondition(
                f"this stage's model directory holds layers {self.held.layers} "
                f"only (a submodel); the plan gives it {start}-{end - 1}: "
                f"it lacks layers {describe(missing)} (start it with --fetch-weights to take "
                "them from the orchestrator)"
            )
        with self._admin:
            loaded = self.loaded
            w = loaded.model.weights if loaded is not None else None
            same = w is not None and w.span == LayerRange(start, end) and peers == self.peers
            if self._check_epoch(epoch, same):
                self._load(start, end, epoch)
                self.peers = peers

    def _load(self, start: int, end: int, epoch: int) -> None:
        shape = CacheShape(
            num_layers=end - start,
            kv_heads=self.args.num_kv_heads,
            head_dim=self.args.head_dim,
            dtype=self.dtype,
            device=self.device,
            max_positions=self.max_context,
        )
        static = self.config.use_static_kv
        if static:
            check_slot_budget(shape, self.config.kv_cache_mb * 2**20)  # before dropping anything
        source, kinds = self._source(start, end)  # before dropping anything too
        with self.compute_lock:
            self._release(epoch)  # free the old range before reading the new one
            quant = Quantization(self.config.quantize, self.config.group, self.rows_quantized)
            weights = load_range(source, self.args, start, end, self.dtype, self.device, quant)
            self.weights_source = "+".join(kinds)
            cache = SessionCache(
                shape,
                self.config.kv_cache_mb * 2**20,
                self.config.session_ttl_s,
                static=static,
            )
            model = range_model(self.args, weights, self.device, self.config.use_batch_invariant)
            decoder = None
            # A CPU batch-invariant range runs every step through its C layers, decode steps
            # on static slots too (their caches are the slots' views).
            if static and not (model.fused is not None and model.fused.every_step):
                graphs = self.config.cuda_graphs and self.device.type == "cuda"
                rows = min(self.config.max_batch, cache.pool.slots)
                decoder = StaticDecoder(model, cache.pool, rows, graphs, self.config.compile)
                if graphs:
                    t0 = time.perf_counter()
                    decoder.capture_all()
                    log.info(
                        "captured %d decode graphs in %.1f s",
                        decoder.captured,
                        time.perf_counter() - t0,
                    )
            self.loaded = LoadedRange(model, cache, weight_bytes(weights), epoch, decoder)
            release_freed_memory()  # the float copies quantization read, and the old range
            if decoder is not None and decoder.graphs:
                # What loading made (graphs, compiled code: a great many objects) is kept out of
                # the collector's full scans, whose pauses would land on ~3 ms decode steps.
                gc.collect()
                gc.freeze()

    def _source(self, start: int, end: int):
        """Where [start, end) is read from, and the kinds of source that makes (checked before
        the range in force is dropped: a range the stage cannot read leaves it serving)."""
        local = TensorIndex(self.model_dir) if self.model_dir is not None else None
        missing = self.held.missing(start, end)
        own = "local" if len(self.held.layers) == self.args.num_layers else "submodel"
        kinds = [own] if len(missing) < end - start else []  # some layers are its own
        if not missing:
            return TensorSource(local), kinds
        names = self.shipped.names_for(start, end, self.args.num_layers)
        offered = {layer_of(n) for n in names}
        lacking = [i for i in missing if i not in offered]
        if lacking:
            raise FailedPrecondition(
                f"layers {describe(lacking)} are neither in this stage's model directory nor "
                "in the weights offered to it: the orchestrator ships a range's tensors "
                "(OfferWeights, PutWeights) before it assigns the range"
            )
        source, shipped_kinds = self.shipped.source(local, names)
        return source, kinds + shipped_kinds

    # ------------------------------------------------------------------ weights over the wire

    def offer_weights(
        self, fingerprint: str, config_json: str, entries: list[Entry]
    ) -> OfferAnswer:
        """What the weights cache lacks of a range the orchestrator offers; a stage without
        a model directory takes the model's config from the first offer."""
        if self.shipped is None:
            raise FailedPrecondition(
                "this stage was started without --fetch-weights: it reads its weights from "
                f"{self.model_dir} only"
            )
        if self.fingerprint and fingerprint != self.fingerprint:
            raise FailedPrecondition(
                f"this stage holds model {self.fingerprint} (its --model {self.model_dir}); "
                f"the orchestrator offers model {fingerprint}: give them the same model"
            )
        answer = self.shipped.take_offer(fingerprint, config_json, entries)
        with self._admin:
            if self.args is None:
                self.args = LlamaArgs.from_config(self.shipped.offer.config)
                self.fingerprint = fingerprint
        return answer

    def close(self) -> None:
        """Releases the weights cache directory (for another stage in this process)."""
        if self.shipped is not None:
            self.shipped.cache.close()

    def receive_weights(self, chunks) -> tuple[int, int]:
        """Bytes of offered tensors into the cache: (bytes written, tensors completed)."""
        if self.shipped is None:
            raise FailedPrecondition("this stage was started without --fetch-weights")
        return self.shipped.receive(chunks)

    @property
    def rows_quantized(self) -> bool:
        """Whether the embedding and head are quantized too (CPU; see weights.Quantization)."""
        return self.device.type == "cpu"

    @property
    def max_context(self) -> int:
        """The most tokens a session may reach on this stage."""
        if self.args is None:
            return 0
        context = self.args.max_position_embeddings
        return min(self.config.max_context or context, context)

    @property
    def holds_head(self) -> bool:
        """Whether this stage samples tokens (it holds the final norm and lm_head)."""
        loaded = self.loaded
        return loaded is not None and loaded.model.weights.is_last

    def require_loaded(self) -> LoadedRange:
        loaded = self.loaded
        if loaded is None:
            raise FailedPrecondition(
                "this stage holds no layers yet; the orchestrator assigns them"
            )
        return loaded
