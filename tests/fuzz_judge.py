"""The judge of the fuzz test (tests/test_fuzz.py): what each answer may be (a refusal with a
precise status; UNAVAILABLE only where the fuzz itself made a stage unreachable; bytes that are
not a valid message refused INVALID_ARGUMENT; an OK call's replies valid messages, each streamed
step's own status a refusal or OK), the tallies per RPC and the summary table. What an answer
shows about the mesh (a cached session, an ended one, a Generate's id) it tells `Requests`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from protos import llamadist_pb2 as pb
from tests.fuzz_requests import REQUEST_TYPES, Requests

# Refusals and answers; UNAVAILABLE only in the cases `unreachable_reason` names.
ACCEPTED = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "OUT_OF_RANGE",
    "PERMISSION_DENIED",
}
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def parses(request_type, raw: bytes) -> bool:
    """Whether `raw` is a valid message (as protos/shared/handlers.py parses it)."""
    try:
        request_type.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return False
    return True


def generate_kind(raw: bytes) -> str:
    """Which tokenizer path a GenerateRequest takes: prompt, chat, token_ids (+stop), or none."""
    try:
        msg = pb.GenerateRequest.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return "not a message"
    kind = msg.WhichOneof("input") or "no input"
    return f"{kind} + stop" if msg.stop else kind


@dataclass
class Judge:
    """Every answer's verdict (`failures`) and the tallies the test's floors are checked on."""

    seed: int
    requests: Requests  # told what the answers showed
    counts: dict[str, Counter] = field(default_factory=dict)  # codes per RPC
    seconds: Counter = field(default_factory=Counter)  # per RPC
    failures: list[str] = field(default_factory=list)
    broken_calls: int = 0  # calls made while the orchestrator's plan was not what stages hold
    unavailable: Counter = field(default_factory=Counter)  # accepted UNAVAILABLE, by reason
    invalid_bytes: Counter = field(default_factory=Counter)  # per RPC
    skipped: Counter = field(default_factory=Counter)
    generate_kinds: dict[str, Counter] = field(default_factory=dict)
    finish_reasons: Counter = field(default_factory=Counter)

    @property
    def replay(self) -> str:
        return f"replay with LLAMADIST_FUZZ_SEED={self.seed}"

    def record(self, rpc: str, raw: bytes, code: str, seconds: float, layout_broken: str) -> None:
        """Tallies one call: its code, its time, whether the layout was broken during it."""
        self.seconds[rpc] += seconds
        self.broken_calls += bool(layout_broken)
        self.counts.setdefault(rpc, Counter())[code] += 1
        if rpc in ("Orchestrator.Generate", "Orchestrator.GenerateStream"):
            self.generate_kinds.setdefault(generate_kind(raw), Counter())[code] += 1

    def unreachable_reason(self, rpc: str, raw: bytes, detail: str, layout_broken: str) -> str:
        """Why an UNAVAILABLE answer is what the fuzz itself caused, or "" when it is not: a
        Generate while the plan's stages do not hold its layers (`layout_broken` says which; the
        detail names a stage), or a plan request naming an address that is no stage (the detail
        names it)."""
        if rpc in ("Orchestrator.Generate", "Orchestrator.GenerateStream"):
            if layout_broken and "stage" in detail:
                return "Generate on a broken layout"
            return ""
        if rpc in ("Orchestrator.PreviewPlan", "Orchestrator.ReloadPlan") and parses(
            pb.PlanRequest, raw
        ):
            named = [
                a.strip()
                for group in pb.PlanRequest.FromString(raw).stages
                for a in group.split("+")
                if a.strip()
            ]
            junk = [a for a in named if a not in self.requests.stages]
            if any(a in detail for a in junk):
                return "a plan naming an address that is no stage"
        return ""

    def judge(
        self, rpc: str, address: str, raw: bytes, code: str, detail: str, layout_broken: str
    ) -> None:
        """The verdict on one answer: a failure unless `code` is one the request may get."""
        if not parses(REQUEST_TYPES[rpc], raw):
            self.invalid_bytes[rpc] += 1
            if code != "INVALID_ARGUMENT" or "not a valid llamadist." not in detail:
                self.fail(rpc, address, raw, code, f"{detail} (bytes that are not a valid message)")
            return
        if code == "UNAVAILABLE":
            reason = self.unreachable_reason(rpc, raw, detail, layout_broken)
            if reason:
                self.unavailable[reason] += 1
                return
            detail = f"{detail} (no stage was made unreachable: layout {layout_broken!r})"
        elif code == "DEADLINE_EXCEEDED":
            detail = f"{detail} (no answer within the deadline: a hang)"
        elif code in ACCEPTED:
            return
        self.fail(rpc, address, raw, code, detail)

    def fail(self, rpc: str, address: str, raw: bytes, code: str, detail: str) -> None:
        self.failures.append(
            f"{rpc} to {address} -> {code}: {detail}\n  request {raw.hex()}\n  {self.replay}"
        )

    def answered(self, rpc: str, address: str, raw: bytes, reply_type, replies: list) -> None:
        """Checks the replies of an OK call: valid messages, and each streamed step's status."""
        try:
            parsed = [reply_type.FromString(r) for r in replies]
        except DecodeError as err:
            self.fail(rpc, address, raw, "OK", f"a reply is not a valid message: {err}")
            return
        if rpc == "Stage.Forward":  # a session the stage now caches: for EndSession
            self.requests.stepped(address, pb.StepRequest.FromString(raw).session_id)
        if rpc == "Stage.EndSession":
            self.requests.ended(address, pb.EndSessionRequest.FromString(raw).session_id)
        if rpc == "Stage.ForwardStream":
            steps = self.counts.setdefault("Stage.ForwardStream steps", Counter())
            sent = pb.StepBatch.FromString(raw).steps
            replies = [s for r in parsed for s in r.replies]
            if any(r.route for r in sent):
                # forwarded steps are answered elsewhere (their origin's outlet, which the
                # fuzz does not hold), so only a count and each answer's code can be checked
                here = sum(not r.route for r in sent)
                if not here <= len(replies) <= len(sent):
                    detail = f"{len(sent)} steps ({here} unrouted), {len(replies)} replies"
                    self.fail(rpc, address, raw, "OK", detail)
                for step in replies:
                    code = STATUS_NAMES.get(step.error_code, f"code {step.error_code}")
                    steps[code] += 1
                    # a successor that is no stage: UNAVAILABLE naming the hop after this one
                    if code not in ACCEPTED and not (code == "UNAVAILABLE" and step.failed_hop):
                        self.fail(rpc, address, raw, f"a step {code}", step.error_message)
                return
            if len(replies) != len(sent):
                detail = f"{len(sent)} steps, {len(replies)} replies"
                self.fail(rpc, address, raw, "OK", detail)
                return
            for request, step in zip(sent, replies, strict=True):
                code = STATUS_NAMES.get(step.error_code, f"code {step.error_code}")
                steps[code] += 1
                if code == "OK":
                    self.requests.stepped(address, request.session_id)
                elif code not in ACCEPTED:  # a stage step is never UNAVAILABLE: it is alive
                    self.fail(rpc, address, raw, f"a step {code}", step.error_message)
        if rpc.startswith("Orchestrator.Generate") and parsed:
            self.requests.generated(parsed[-1].session_id)
            self.finish_reasons[pb.FinishReason.Name(parsed[-1].finish_reason)] += 1

    def summary(self, digest: str) -> str:
        """A table of the codes per RPC, the tallies, and `digest` (of the request sequence)."""
        tables = {**self.counts, **{f"Generate: {k}": c for k, c in self.generate_kinds.items()}}
        codes = sorted({c for counter in tables.values() for c in counter})
        width = max(len(r) for r in tables) + 2
        head = "".join(f"{c[:12]:>13}" for c in codes)
        lines = [f"{'rpc':<{width}}{head}{'total':>8}{'seconds':>9}"]
        for rpc, counter in sorted(tables.items()):
            cells = "".join(f"{counter.get(c, 0):>13}" for c in codes)
            seconds = f"{self.seconds[rpc]:>9.1f}" if rpc in self.seconds else ""
            lines.append(f"{rpc:<{width}}{cells}{sum(counter.values()):>8}{seconds}")
        lines += [
            f"bytes that are not a valid message: {dict(self.invalid_bytes)}",
            f"UNAVAILABLE accepted: {dict(self.unavailable)}; calls on a broken layout: "
            f"{self.broken_calls}; skipped: {dict(self.skipped)}",
            f"generations finished by: {dict(self.finish_reasons)}",
            f"request sequence sha256 {digest[:16]} (seed {self.seed})",
        ]
        return "\n".join(lines)
