"""Soak (issue 5): concurrent sessions of random lengths against a 2-stage mesh on loopback.

    python -m tests.soak --seconds 300 [--sessions 32] [--slots 40] [--model DIR] [--seed S]

Starts a 2-stage LocalMesh (default: a tiny random Llama with a 256-token context, made in a
temporary directory), then `--sessions` client threads run back-to-back sessions: random prompt
lengths and max_new_tokens (within the context), greedy or sampled, unary or streamed, some
abandoned halfway (EndSession, then the stream is closed), some greedy canaries whose answer must
equal the idle mesh's. A warm-up phase (every thread runs a full-context session first) comes
before the timed run; every call has a deadline and the threads are joined with one.

Each thread's plan: its full-context session, then random sessions until the deadline, at least
one (MIN_SESSIONS in all). Fails (exit 1) when a thread does not carry it out — still running
after its deadline, ended by an exception (named, its traceback printed), or fewer sessions
completed than planned — and on any error, a canary mismatch, a process that died, KV cache not
back to zero (kv_used_bytes and active_sessions on every stage) or resident memory of any
process grown by 5 % or more from the end of the warm-up to the end of the run. Prints a summary
either way.

`--slots N` runs the stages with static KV slots (`--static-kv on`) and a `--kv-cache-mb` that
holds about N slots per stage, a few more than the threads' sessions, so that a slot not given
back soon starves them. kv_used_bytes counts the sessions a stage holds, not its free list, so
after the run a probe takes every slot of each stage with sessions of its own (Forward, one
token each): all must be taken, one more refused (RESOURCE_EXHAUSTED), then they are ended.

The orchestrator runs at most 32 concurrent generations per client (--max-sessions-per-client,
keyed by API key, else by host): 32 threads from this host fit exactly, because a finished
generation frees its slot before its last reply reaches the client (streams are read to the
end; an abandoned one is ended with EndSession, which waits for it). Above 32, the mesh gets an
API keys file and the threads use one client key per 32.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from client.client import Client, ClientError
from client.launcher import LocalMesh
from protos.shared.stage_auth import load_stage_key
from tests.soak_kv import caches_back_to_zero, probe_slots, static_slot_args

PER_CLIENT_CAP = 32  # the orchestrator's default --max-sessions-per-client
CALL_TIMEOUT_S = 120.0  # one generation; a full-context one under full load takes ~30 s here
RSS_LIMIT = 0.05
CANARY = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]
CANARY_TOKENS = 32
MIN_SESSIONS = 2  # per thread: its full-context session and at least one random one


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: int = 0
    streamed: int = 0
    abandoned: int = 0
    canaries: int = 0
    prompt_tokens: int = 0
    tokens: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, **counts) -> None:
        with self.lock:
            for name, value in counts.items():
                if name == "latency_s":
                    self.latencies_s.append(value)
                elif name == "error":
                    self.errors.append(value)
                else:
                    setattr(self, name, getattr(self, name) + value)


@dataclass
class Worker:
    """One client thread and how far it got."""

    index: int
    thread: threading.Thread | None = None
    started: int = 0  # sessions begun
    completed: int = 0  # sessions that ended without an error
    finished: bool = False  # it reached its deadline: no exception ended it
    crash: str = ""  # the traceback of the exception that ended it


def model_shape(model: Path) -> tuple[int, int]:
    config = json.loads((model / "config.json").read_text())
    return config["vocab_size"], config["max_position_embeddings"]


def one_session(
    client: Client,
    rng: random.Random,
    vocab: int,
    context: int,
    canary: list[int],
    tag: str,
    full: bool = False,
) -> dict:
    """Runs one random session; returns the counts to add to Stats. Raises ClientError."""
    kind = rng.random()
    if kind < 0.05 and not full:  # a canary: greedy, must equal the idle mesh's answer
        reply = client.generate(token_ids=CANARY, max_new_tokens=CANARY_TOKENS, ignore_eos=True)
        if reply.token_ids != canary:
            raise AssertionError(f"canary answered {reply.token_ids}, expected {canary}")
        return dict(canaries=1, prompt_tokens=len(CANARY), tokens=len(reply.token_ids))
    if full:
        prompt_len = rng.randint(1, context - 1)
        max_new = context - prompt_len
    else:
        prompt_len = rng.randint(1, context // 2)
        max_new = rng.randint(1, min(context - prompt_len, 96))
    request = dict(
        token_ids=[rng.randrange(vocab) for _ in range(prompt_len)],
        max_new_tokens=max_new,
        ignore_eos=True,
    )
    if rng.random() < 0.5:
        request.update(
            temperature=rng.choice([0.7, 1.0, 1.3]),
            top_k=rng.choice([0, 20, 50]),
            top_p=rng.choice([1.0, 0.9]),
            repetition_penalty=rng.choice([1.0, 1.1]),
            seed=rng.randrange(2**32),
        )
    if rng.random() < 0.5:
        request["session_id"] = tag
    mode = rng.random()
    if full or mode < 0.4:
        reply = client.generate(**request)
        got = len(reply.token_ids)
        if got != max_new:
            raise AssertionError(f"{got} tokens for max_new_tokens {max_new}")
        return dict(prompt_tokens=prompt_len, tokens=got)
    stream = client.stream(**request)
    if mode < 0.9 or max_new < 4:
        pieces = list(stream)  # read to the end: the slot is free when this returns
        got = sum(len(p.token_ids) for p in pieces)
        if got != max_new or pieces[-1].finish_reason != "length":
            raise AssertionError(f"{got} tokens, finish {pieces[-1].finish_reason!r}")
        return dict(prompt_tokens=prompt_len, tokens=got, streamed=1)
    # Abandoned halfway: EndSession cancels the generation and waits for it to free its caches.
    got, session_id = 0, ""
    for piece in stream:
        got += len(piece.token_ids)
        session_id = piece.session_id
        if got >= max_new // 2:
            break
    try:
        client.end_session(session_id)
    except ClientError as err:
        if err.code != "NOT_FOUND":  # it may have finished meanwhile
            raise
    stream.close()
    return dict(prompt_tokens=prompt_len, tokens=got, abandoned=1)


@dataclass(frozen=True)
class Run:
    """What every thread shares: the mesh, the model's shape, the clock and the counts."""

    address: str
    seed: int
    vocab: int
    context: int
    canary: list[int]
    warmup_until: float
    stop_at: float
    stats: Stats
    warm: Stats


def worker(w: Worker, run: Run, api_key: str | None) -> None:
    """Runs w's plan (see the module docstring). A session's ClientError or AssertionError is
    an error in the stats and the thread goes on; anything else ends it, kept in w.crash."""
    rng = random.Random(run.seed * 1000 + w.index)
    try:
        with Client(run.address, timeout_s=CALL_TIMEOUT_S, api_key=api_key) as client:
            while w.started < MIN_SESSIONS or time.monotonic() < run.stop_at:
                n = w.started
                w.started += 1
                t0 = time.monotonic()
                target = run.warm if t0 < run.warmup_until else run.stats
                try:
                    counts = one_session(
                        client,
                        rng,
                        run.vocab,
                        run.context,
                        run.canary,
                        tag=f"soak-{w.index}-{n}",
                        full=n == 0,
                    )
                except (ClientError, AssertionError) as err:
                    target.add(error=f"thread {w.index} session {n}: {err}")
                    counts = {}
                else:
                    w.completed += 1
                target.add(sessions=1, latency_s=time.monotonic() - t0, **counts)
        w.finished = True
    except BaseException:  # noqa: BLE001 - whatever it is, the soak fails naming it
        w.crash = traceback.format_exc()


def worker_failures(workers: list[Worker]) -> list[str]:
    """What each thread left undone; prints the tracebacks of those an exception ended."""
    failures = []
    hung = [w.index for w in workers if w.thread.is_alive()]
    if hung:
        failures.append(f"{len(hung)} client threads still running after their deadline: {hung}")
    shown = 0
    for w in workers:
        if w.thread.is_alive():
            continue
        if w.crash:
            where = f"in session {w.started - 1}" if w.started else "before its first session"
            failures.append(f"thread {w.index} died {where}: {w.crash.splitlines()[-1]}")
            if shown < 5:  # the first few tracebacks; each thread's exception is in its line
                print(f"\nthread {w.index} died {where}:\n{w.crash}", end="")
                shown += 1
        elif not w.finished or w.completed < MIN_SESSIONS:
            failures.append(
                f"thread {w.index} completed {w.completed} of {w.started} sessions "
                f"(at least {MIN_SESSIONS} planned)"
            )
    return failures


def rss(mesh: LocalMesh) -> dict[str, int]:
    return {p.name: psutil.Process(p.proc.pid).memory_info().rss for p in mesh.processes}


def soak(
    model: Path,
    seconds: float,
    sessions: int,
    seed: int,
    log_dir: Path,
    warmup_s: float,
    stage_args: list[str] | None = None,
    slots: int = 0,
) -> int:
    vocab, context = model_shape(model)
    stage_args = list(stage_args or [])
    if slots:
        stage_args += static_slot_args(model, slots, stage_args)
    keys_file, keys = "", [None]
    if sessions > PER_CLIENT_CAP:  # one client identity per 32 threads
        keys = [f"{seed:x}{i:04x}" + "0" * 40 for i in range(-(-sessions // PER_CLIENT_CAP))]
        keys_file = str(log_dir / "api-keys")
        Path(keys_file).write_text("".join(f"{k} client\n" for k in keys))
    print(f"soak: model {model}, {sessions} sessions, {seconds:.0f} s (+ {warmup_s:.0f} s warm-up)")
    print(f"stage options: {' '.join(stage_args) or '(defaults)'}")
    mesh = LocalMesh(
        str(model), 2, log_dir=log_dir, api_keys_file=keys_file, extra_stage_args=stage_args
    )
    with mesh:
        stages = [p.address for p in mesh.processes if p.name.startswith("stage")]
        print(f"mesh: orchestrator {mesh.address}, stages {stages}, logs {log_dir}")
        with Client(mesh.address, timeout_s=60, api_key=keys[0]) as client:
            canary = client.generate(
                token_ids=CANARY, max_new_tokens=CANARY_TOKENS, ignore_eos=True
            ).token_ids
        stats, warm = Stats(), Stats()
        t_start = time.monotonic()
        warmup_until = t_start + warmup_s
        stop_at = warmup_until + seconds
        run = Run(mesh.address, seed, vocab, context, canary, warmup_until, stop_at, stats, warm)
        workers = [Worker(i) for i in range(sessions)]
        for w in workers:
            key = keys[w.index // PER_CLIENT_CAP]
            w.thread = threading.Thread(target=worker, args=(w, run, key), daemon=True)
            w.thread.start()
        time.sleep(max(0.0, warmup_until - time.monotonic()))
        rss_before = rss(mesh)
        t_run = time.monotonic()
        for w in workers:  # a thread's last session may start just before stop_at
            w.thread.join(max(1.0, stop_at + 2 * CALL_TIMEOUT_S - time.monotonic()))
        elapsed = time.monotonic() - t_run
        failures = worker_failures(workers)

        dead = [p.name for p in mesh.processes if p.proc.poll() is not None]
        if dead:
            failures.append(f"processes died: {dead}")
            infos = []
        else:
            key = load_stage_key(mesh.stage_key_file) if mesh.stage_key_file else None
            infos, failure = caches_back_to_zero(stages, key)
            failures += [failure] if failure else []
            if slots:
                hidden_size = json.loads((model / "config.json").read_text())["hidden_size"]
                failures += filter(None, (probe_slots(a, hidden_size, key) for a in stages))
        rss_after = rss(mesh) if not dead else {}

        print(
            f"\nwarm-up: {warm.sessions} sessions, {warm.tokens} tokens, {len(warm.errors)} errors"
        )
        print(
            f"run: {elapsed:.1f} s, {stats.sessions} sessions ({stats.streamed} streamed, "
            f"{stats.abandoned} abandoned, {stats.canaries} canaries), "
            f"{stats.prompt_tokens} prompt tokens, {stats.tokens} generated tokens, "
            f"{stats.tokens / elapsed:.1f} tok/s, {len(stats.errors)} errors"
        )
        if stats.latencies_s:
            lat = sorted(stats.latencies_s)
            print(
                f"session latency: median {statistics.median(lat):.2f} s, "
                f"p99 {lat[int(0.99 * (len(lat) - 1))]:.2f} s, max {lat[-1]:.2f} s"
            )
        for a, i in zip(stages, infos):  # noqa: B905 - none when a process died
            print(
                f"stage {a}: kv_used_bytes {i.kv_used_bytes}, active_sessions {i.active_sessions}"
            )
        for name, before in rss_before.items():
            after = rss_after.get(name)
            if after is None:
                continue
            growth = after / before - 1
            print(
                f"rss {name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({growth:+.2%})"
            )
            if growth >= RSS_LIMIT:
                failures.append(f"{name} resident memory grew {growth:.1%} (limit {RSS_LIMIT:.0%})")
        errors = warm.errors + stats.errors
        if errors:
            failures.append(f"{len(errors)} errors")
            for e in errors[:10]:
                print("error:", e)
        if not stats.sessions:
            failures.append("no session ran after the warm-up")
    for f in failures:
        print("FAIL:", f)
    print("soak:", "FAILED" if failures else "passed")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=300.0, help="timed run after the warm-up")
    p.add_argument("--sessions", type=int, default=32, help="concurrent client threads")
    p.add_argument(
        "--slots",
        type=int,
        default=0,
        help="static KV slots per stage (--static-kv on, --kv-cache-mb to fit), all checked "
        "free after the run; at least --sessions (0 = the stage options' KV layout)",
    )
    p.add_argument("--model", default="", help="model directory (default: a tiny random one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=None,
        help="warm-up before the RSS baseline (default: 10%% of --seconds, 10 to 60 s)",
    )
    p.add_argument("--log-dir", default="", help="process logs (default: a temporary directory)")
    p.add_argument(
        "--stage-args",
        default="",
        help="more stage options, e.g. '--static-kv on --max-context 256'",
    )
    args = p.parse_args(argv)
    if args.slots and args.slots < args.sessions:
        p.error(f"--slots {args.slots}: each of the {args.sessions} sessions holds one")
    warmup_s = args.warmup_seconds
    if warmup_s is None:
        warmup_s = min(60.0, max(10.0, args.seconds / 10))
    with tempfile.TemporaryDirectory(prefix="llamadist-soak-") as tmp:
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        if args.model:
            model = Path(args.model)
        else:
            from tests.conftest import make_tiny_model  # torch + transformers: only when needed

            model = make_tiny_model(Path(tmp), "gqa")  # 4 layers, 256-token context
        stage_args = args.stage_args.split()
        return soak(
            model, args.seconds, args.sessions, args.seed, log_dir, warmup_s, stage_args, args.slots
        )


if __name__ == "__main__":
    sys.exit(main())
