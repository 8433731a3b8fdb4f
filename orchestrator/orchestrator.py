"""The orchestrator's domain object: the router, the tokenizer, the generator and the planner
(model profile + live stage capacities -> plan), with start-up, preview and live reload.
No gRPC service in here (orchestrator/servicer.py is one)."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.drafting import Drafter, PromptLookup
from orchestrator.generation import Generator
from orchestrator.metrics import OrchestratorMetrics, outcome_of
from orchestrator.plan import PartitionPlan
from orchestrator.plan_checks import check_held_layers, check_positions, position_capacity
from orchestrator.plan_spec import PlanSpec, spec_from_text
from orchestrator.profile import ModelProfile, StageCapacity
from orchestrator.replicas import split_group
from orchestrator.router import Router
from orchestrator.speculation import SpeculationPolicy
from orchestrator.strategies import estimate_ms_per_token, make_plan
from orchestrator.tokenizer import Tokenizer
from orchestrator.weight_shipping import WeightShipper
from protos import llamadist_pb2 as pb
from protos.errors import FailedPrecondition, LlamadistError, Unavailable
from protos.sampling import Speculate
from protos.shared.hop import HopDialer
from protos.shared.model_files import LlamaArgs, model_fingerprint, read_config

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
START_RETRY_S = (1.0, 8.0)  # a failed first plan is tried again after 1 s, doubling up to 8 s


@dataclass(frozen=True)
class PlanRequest:
    """What an operator asks for; empty fields keep the start-up defaults."""

    strategy: str = ""
    num_partitions: int = 0
    max_memory: str = ""
    boundaries: str = ""
    stages: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageEstimate:
    device: str
    weight_bytes: int
    kv_capacity_tokens: int
    ms_per_token: float
    quantize: str = "none"  # the stage's weight format
    fetch_bytes: int = 0  # preview: bytes it lacks that the orchestrator would ship; reload: sent
    fetch_seconds: float = 0.0  # reload: time the shipping took


@dataclass(frozen=True)
class PlanView:
    plan: PartitionPlan
    stages: tuple[StageEstimate, ...]
    max_context: int  # the longest session every stage of the plan serves
    stage_epoch: int = 0  # the newest plan epoch any of its stages holds (a new plan goes above)


def generation_defaults(model_dir: Path) -> dict[str, float]:
    """The model's own sampling defaults (generation_config.json), which the HTTP API uses where
    a request leaves them out: greedy (temperature 0) when the file says do_sample false, and
    OpenAI's defaults (temperature 1, top_p 1) when there is no file."""
    path = Path(model_dir) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    if cfg.get("do_sample") is False:
        return {"temperature": 0.0}
    out = {}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = cfg.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def plan_spec(request: PlanRequest) -> PlanSpec:
    return spec_from_text(
        request.strategy, request.num_partitions, request.max_memory, request.boundaries
    )


def speculation_policy(config: OrchestratorConfig, vocab_size: int) -> SpeculationPolicy:
    """--speculate and its drafters: prompt lookup always, a draft model when given."""
    drafters: dict[Speculate, Drafter] = {Speculate.LOOKUP: PromptLookup()}
    if config.draft_model:
        from orchestrator.draft_model import DraftModel

        drafters[Speculate.DRAFT] = DraftModel(
            Path(config.draft_model), Path(config.model), vocab_size
        )
    return SpeculationPolicy(
        Speculate(config.speculate),
        config.speculate_k,
        config.speculate_max_sessions,
        drafters,
    )


class Orchestrator:
    def __init__(
        self,
        config: OrchestratorConfig,
        *,
        stage_credentials: grpc.ChannelCredentials | None = None,
        stage_key: str | None = None,
    ):
        """`stage_credentials` (protos.shared.security.channel_credentials): mutual TLS toward
        the stages, None = plaintext; `stage_key`: the mesh's stage key, None = none."""
        self.config = config
        self.model_dir = Path(config.model)
        self.args = LlamaArgs.from_config(read_config(self.model_dir))
        self.fingerprint = model_fingerprint(self.model_dir)
        self.router = Router(
            config.step_timeout_s,
            config.prefill_chunk_tokens,
            config.prefill_tokens_in_flight,
            cohorts=config.cohorts,
            reassign=self.reassign,
            before_load=self._ship,
            channel_credentials=stage_credentials,
            stage_key=stage_key,
            hop=HopDialer.from_flags(
                config.hop, config.tls_ca, config.tls_cert, config.tls_key, stage_key
            ),
        )
        self.shipper = WeightShipper(self.model_dir, self.fingerprint)
        self.tokenizer = Tokenizer(self.model_dir)
        self.metrics = OrchestratorMetrics(self)  # reads the generator when scraped
        self.generator = Generator(
            self.router,
            self.tokenizer,
            self.args.vocab_size,
            self.args.max_position_embeddings,
            config.max_sessions_per_client,
            config.sessions_file,
            speculation_policy(config, self.args.vocab_size),
            self.metrics,
        )
        self.default_request = PlanRequest(
            strategy=config.strategy,
            max_memory=config.max_memory,
            boundaries=config.boundaries,
            stages=tuple(config.stages),
        )
        self.generation_defaults = generation_defaults(self.model_dir)
        self.view: PlanView | None = None
        self.startup_error = ""
        self._profiles: dict[tuple[int, str], ModelProfile] = {}
        self._reload_lock = threading.RLock()  # re-entered by _retry_start's check
        self._closed = threading.Event()

    # ------------------------------------------------------------------ planning

    def profile(self, dtype_bytes: int, weight_format: str = "none") -> ModelProfile:
        """The model at a stage's dtype and weight format (--quantize), built once each."""
        key = (dtype_bytes, weight_format or "none")
        if key not in self._profiles:
            self._profiles[key] = ModelProfile.from_model_dir(
                self.model_dir, dtype_bytes, weight_format=key[1]
            )
        return self._profiles[key]

    def preview(self, request: PlanRequest, wait_s: float = 5.0, epoch: int = 0) -> PlanView:
        """The plan a request would make, from the stages' live capacities; changes nothing."""
        spec = plan_spec(request)
        addresses = list(request.stages or self.default_request.stages)
        check_positions(addresses)
        groups = [
            self.router.infos(group, i, wait_s, self.fingerprint)
            for i, group in enumerate(addresses)
        ]
        capacities = [
            position_capacity(g, infos) for g, infos in zip(addresses, groups, strict=True)
        ]
        # Each position at its own format: its first replica's (replicas serve the same range).
        profiles = [self.profile(DTYPE_BYTES.get(g[0].dtype, 4), g[0].quantize) for g in groups]
        current = self.router.plan
        plan = make_plan(profiles, capacities, spec, epoch or (current.epoch + 1 if current else 1))
        check_held_layers(plan, groups)
        estimates = self._estimates(plan, capacities, profiles, groups)
        contexts = [i.max_context for g in groups for i in g if i.max_context > 0]
        max_context = min([self.args.max_position_embeddings, *contexts])
        stage_epoch = max(i.plan_epoch for g in groups for i in g)
        return PlanView(plan, estimates, max_context, stage_epoch)

    def _estimates(
        self,
        plan: PartitionPlan,
        capacities: list[StageCapacity],
        profiles: list[ModelProfile],
        groups: list[list[pb.StageInfo]],
    ) -> tuple[StageEstimate, ...]:
        """What each position of `plan` would hold and do: weights, KV capacity, ms per token,
        and the bytes the orchestrator would ship to it (its replicas' most)."""
        by_address = {c.address: c for c in capacities}
        estimates = []
        for i, (address, layers) in enumerate(zip(plan.addresses, plan.ranges, strict=True)):
            cap, profile = by_address[address], profiles[i]
            first, last = i == 0, i == plan.num_stages - 1
            per_token = profile.kv_bytes_per_token_per_layer * len(layers)
            estimates.append(
                StageEstimate(
                    device=cap.device,
                    weight_bytes=profile.stage_weight_bytes(layers, first, last),
                    kv_capacity_tokens=cap.kv_budget_bytes // per_token,
                    ms_per_token=estimate_ms_per_token(profile, cap, layers, first, last),
                    quantize=groups[i][0].quantize or "none",
                    fetch_bytes=max(
                        self.shipper.lacking_bytes(layers.start, layers.end, info)
                        if info.fetches_weights
                        else 0
                        for info in groups[i]
                    ),  # fmt: skip
                )
            )
        return tuple(estimates)

    def reload(self, request: PlanRequest) -> PlanView:
        """Applies a new plan while serving: steps in flight finish first, new ones wait, and
        sessions replay their history onto the new layout. A failed apply restores the old plan."""
        try:
            view = self._reload(request)
        except Exception as err:
            self.metrics.reloads.labels(outcome_of(err)).inc()
            raise
        self.metrics.reloads.labels("ok").inc()
        return view

    def _reload(self, request: PlanRequest) -> PlanView:
        with self._reload_lock:
            view = self.preview(request)  # infeasible specs fail here; nothing has changed
            return self._apply(view)

    def reassign(self, above: int) -> None:
        """Assigns the plan in force again, under an epoch above `above` and every epoch its
        stages hold: a stage reported epoch `above` (at or past ours) without our layers, moved
        by someone else (an admin's LoadLayers, a second orchestrator). Stages take only newer
        epochs, so ours adopts one above theirs rather than wait for the stage to come back
        down; every stage reloads its range and sessions replay, as after a reload. The router's
        prober calls this; a failure leaves the stage down and the prober tries again."""
        with self._reload_lock:
            plan, view = self.router.plan, self.view
            if plan is None or view is None or plan.epoch > above:
                return  # a reload went above it meanwhile (and assigned the stage its layers)
            held = max(above, self.router.newest_epoch())
            self._apply(dataclasses.replace(view, plan=plan, stage_epoch=held))

    def _apply(self, view: PlanView) -> PlanView:
        """Puts `view`'s plan in force above every epoch it knows of (hold the reload lock)."""
        # Weights a stage lacks travel first, while it serves its old range.
        view = self._ship_plan(view)
        with self.router.exclusive():
            old = self.router.plan
            # Above every epoch a stage holds: stages refuse older assignments, and after
            # an orchestrator restart they still hold the previous run's epochs.
            epoch = max(old.epoch if old else 0, view.stage_epoch) + 1
            if epoch >= 2**64:
                raise FailedPrecondition(
                    f"a stage holds plan epoch {view.stage_epoch}, the last there is; "
                    "restart the stages of this plan"
                )
            plan = dataclasses.replace(view.plan, epoch=epoch)
            try:
                self.router.apply(plan)
            except LlamadistError as err:
                if old is None:
                    raise
                log.error("reload to %s failed (%s); restoring the previous plan", plan, err)
                self.router.apply(dataclasses.replace(old, epoch=plan.epoch + 1))
                raise type(err)(f"{err}; the previous plan is restored") from None
            self.view = dataclasses.replace(view, plan=plan)
            self.generator.max_positions = view.max_context
            log.info("plan epoch %d applied: %s", plan.epoch, plan)
            return self.view

    # ------------------------------------------------------------------ weights over the wire

    def _ship(self, client, start: int, end: int, info: pb.StageInfo | None = None):
        """Sends the stage what it lacks of [start, end) (--fetch-weights stages only)."""
        info = client.info() if info is None else info
        return self.shipper.ship(client.stub, client.name, client.address, start, end, info)

    def _ship_plan(self, view: PlanView) -> PlanView:
        """Every stage of the plan that fetches weights gets what it lacks, all stages at once;
        the view's estimates then say what was sent and how long it took."""
        plan = view.plan
        jobs = [
            (i, address, plan.ranges[i])
            for i, group in enumerate(plan.addresses)
            for address in split_group(group)
        ]

        def ship(job):
            i, address, layers = job
            client = self.router.client(address)
            client.index = i
            return self._ship(client, layers.start, layers.end)

        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            results = list(pool.map(ship, jobs))  # the first failure raises here
        sent = [0] * len(view.stages)
        seconds = [0.0] * len(view.stages)
        for (i, _, _), shipped in zip(jobs, results, strict=True):
            if shipped is not None:
                sent[i] += shipped.sent_bytes
                seconds[i] = max(seconds[i], shipped.seconds)
        estimates = [
            dataclasses.replace(est, fetch_bytes=sent[i], fetch_seconds=seconds[i])
            for i, est in enumerate(view.stages)
        ]
        return dataclasses.replace(view, stages=tuple(estimates))

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Waits for the stages and applies the first plan; run it in a background thread so
        that Health answers (NOT_SERVING) meanwhile."""
        try:
            for i, group in enumerate(self.config.stages):
                self.router.infos(group, i, self.config.stage_wait_s, self.fingerprint)
            self.reload(self.default_request)
        except LlamadistError as err:
            self.startup_error = str(err)
            log.error("start-up failed: %s; trying again until a plan is in force", err)
            threading.Thread(target=self._retry_start, name="startup-retry", daemon=True).start()

    def _retry_start(self) -> None:
        """Applies the first plan again until one is in force (an admin's reload counts): a
        cause that goes away, such as a stage's weights cache made writable again, needs no
        admin reload."""
        wait_s = START_RETRY_S[0]
        while not self._closed.wait(wait_s):
            with self._reload_lock:  # an admin's reload is not overridden by the default plan
                if self.router.plan is not None:
                    return
                try:
                    self.reload(self.default_request)
                    self.startup_error = ""
                    log.info("start-up succeeded on a later try")
                    return
                except LlamadistError as err:
                    if str(err) != self.startup_error:
                        log.error("start-up failed again: %s", err)
                    self.startup_error = str(err)
            wait_s = min(wait_s * 2, START_RETRY_S[1])

    def with_defaults(self, sampling: pb.SamplingParams) -> pb.SamplingParams:
        """A copy of `sampling` whose unset fields take the model's generation defaults."""
        out = pb.SamplingParams()
        out.CopyFrom(sampling)
        for name, value in self.generation_defaults.items():
            if not out.HasField(name):
                setattr(out, name, int(value) if name == "top_k" else value)
        return out

    def ready(self) -> tuple[bool, str]:
        if self.router.plan is not None:
            return True, ""
        if self.startup_error:
            return False, f"start-up failed: {self.startup_error}"
        return False, "waiting for stages: " + ", ".join(self.config.stages)

    def require_ready(self) -> None:
        ok, detail = self.ready()
        if not ok:
            raise Unavailable(f"the orchestrator is not ready: {detail}")

    def shut_down(self, deadline: float) -> None:
        """SIGTERM: generations finish or are suspended before `deadline` (time.monotonic())."""
        suspended = self.generator.shut_down(deadline)
        if suspended:
            log.info("suspended %d sessions still running at shutdown", suspended)

    def close(self) -> None:
        self._closed.set()  # ends _retry_start
        self.router.close()
        self.generator.speculation.close()
