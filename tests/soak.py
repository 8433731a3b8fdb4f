"""Soak (issue 5): concurrent sessions of random lengths against a 2-stage mesh on loopback.

    python -m tests.soak --seconds 300 [--sessions 32] [--model DIR] [--seed S]

Starts a 2-stage LocalMesh (default: a tiny random Llama with a 256-token context, made in a
temporary directory), then `--sessions` client threads run back-to-back sessions: random prompt
lengths and max_new_tokens (within the context), greedy or sampled, unary or streamed, some
abandoned halfway (EndSession, then the stream is closed), some greedy canaries whose answer must
equal the idle mesh's. A warm-up phase (every thread runs a full-context session first) comes
before the timed run; every call has a deadline and the threads are joined with one.

Fails (exit 1) on any error, a canary mismatch, a process that died, KV cache not back to zero
(kv_used_bytes and active_sessions on every stage) or resident memory of any process grown by
5 % or more from the end of the warm-up to the end of the run. Prints a summary either way.

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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from client.client import Client, ClientError
from client.launcher import LocalMesh
from protos import llamadist_pb2 as pb

PER_CLIENT_CAP = 32  # the orchestrator's default --max-sessions-per-client
CALL_TIMEOUT_S = 120.0  # one generation; a full-context one under full load takes ~30 s here
RSS_LIMIT = 0.05
CANARY = [7, 3, 99, 12, 45, 60, 2, 81, 33, 5, 18, 70]
CANARY_TOKENS = 32


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


def worker(
    index: int,
    address: str,
    api_key: str | None,
    seed: int,
    vocab: int,
    context: int,
    canary: list[int],
    warmup_until: float,
    stop_at: float,
    stats: Stats,
    warm: Stats,
) -> None:
    rng = random.Random(seed * 1000 + index)
    n = 0
    with Client(address, timeout_s=CALL_TIMEOUT_S, api_key=api_key) as client:
        while True:
            now = time.monotonic()
            if now >= stop_at:
                return
            target = warm if now < warmup_until else stats
            t0 = time.monotonic()
            try:
                counts = one_session(
                    client, rng, vocab, context, canary, f"soak-{index}-{n}", full=n == 0
                )
            except (ClientError, AssertionError) as err:
                target.add(error=f"thread {index} session {n}: {err}")
                counts = {}
            target.add(sessions=1, latency_s=time.monotonic() - t0, **counts)
            n += 1


def stage_infos(addresses: list[str]) -> list[pb.StageInfo]:
    infos = []
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            raw = channel.unary_unary("/llamadist.Stage/Info")(b"", timeout=10)
            infos.append(pb.StageInfo.FromString(raw))
    return infos


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
) -> int:
    vocab, context = model_shape(model)
    keys_file, keys = "", [None]
    if sessions > PER_CLIENT_CAP:  # one client identity per 32 threads
        keys = [f"{seed:x}{i:04x}" + "0" * 40 for i in range(-(-sessions // PER_CLIENT_CAP))]
        keys_file = str(log_dir / "api-keys")
        Path(keys_file).write_text("".join(f"{k} client\n" for k in keys))
    print(f"soak: model {model}, {sessions} sessions, {seconds:.0f} s (+ {warmup_s:.0f} s warm-up)")
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
        threads = [
            threading.Thread(
                target=worker,
                args=(
                    i,
                    mesh.address,
                    keys[i // PER_CLIENT_CAP],
                    seed,
                    vocab,
                    context,
                    canary,
                    warmup_until,
                    stop_at,
                    stats,
                    warm,
                ),
                daemon=True,
            )
            for i in range(sessions)
        ]
        for t in threads:
            t.start()
        time.sleep(max(0.0, warmup_until - time.monotonic()))
        rss_before = rss(mesh)
        t_run = time.monotonic()
        for t in threads:
            t.join(max(1.0, stop_at + 2 * CALL_TIMEOUT_S - time.monotonic()))
        elapsed = time.monotonic() - t_run
        hung = sum(t.is_alive() for t in threads)
        failures = [f"{hung} client threads still running after their deadline"] if hung else []

        dead = [p.name for p in mesh.processes if p.proc.poll() is not None]
        if dead:
            failures.append(f"processes died: {dead}")
            infos = []
        else:
            deadline = time.monotonic() + 5  # caches are freed as replies go out: a moment
            while True:
                infos = stage_infos(stages)
                if all(i.kv_used_bytes == 0 and i.active_sessions == 0 for i in infos):
                    break
                if time.monotonic() > deadline:
                    failures.append(
                        "KV cache not back to zero: "
                        + ", ".join(
                            f"{a} kv_used_bytes={i.kv_used_bytes} "
                            f"active_sessions={i.active_sessions}"
                            for a, i in zip(stages, infos, strict=True)
                        )
                    )
                    break
                time.sleep(0.2)
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
        return soak(model, args.seconds, args.sessions, args.seed, log_dir, warmup_s, stage_args)


if __name__ == "__main__":
    sys.exit(main())
