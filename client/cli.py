"""The `llamadist` command line: services (stage, orchestrator, up), generation, chat, plans and
the default model. Each command's flags sit next to its runner (client/commands_*.py); this
module holds the table of commands and turns every failure into one line on stderr and a non-zero
exit code, never a traceback: 2 for a refused flag or value, 1 for a call or service that failed.
The benchmark is no command: it runs from a source checkout (`make bench`, bench/mesh.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from client import commands_generate as generate
from client import commands_model as model
from client import commands_plan as plan
from client import commands_services as services
from client.client import ClientError
from protos.errors import InvalidArgument, LlamadistError
from protos.shared.logs import TEXT_FORMAT


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: `llamadist: error: ...`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"llamadist: error: {_one_line(message)} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # its flags, next to its runner
    run: Callable[[argparse.Namespace], int]  # -> exit code


COMMANDS = (
    Command(
        "stage",
        "run a stage service (layers come from the orchestrator)",
        services.add_stage_arguments,
        services.run_stage,
    ),
    Command(
        "orchestrator",
        "run the orchestrator service",
        services.add_orchestrator_arguments,
        services.run_orchestrator,
    ),
    Command(
        "up",
        "start N stages and an orchestrator on loopback",
        services.add_up_arguments,
        services.run_up,
    ),
    Command(
        "generate",
        "generate text, streaming it as it arrives",
        generate.add_generate_arguments,
        generate.run_generate,
    ),
    Command(
        "chat", "interactive question and answer", generate.add_chat_arguments, generate.run_chat
    ),
    Command("plan", "the partition plan", plan.add_plan_arguments, plan.run_plan),
    Command(
        "health",
        "exit 0 when the orchestrator serves (with --stage: when the stage answers)",
        plan.add_health_arguments,
        plan.run_health,
    ),
    Command("model", "the embedded default model", model.add_model_arguments, model.run_model),
    Command(
        "certs",
        "make a development CA and certificates for TLS (not for production)",
        model.add_certs_arguments,
        model.run_certs,
    ),
)


def build_parser() -> Parser:
    parser = Parser(prog="llamadist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _fail(err: BaseException, code: int) -> int:
    print(f"llamadist: error: {_one_line(err) or type(err).__name__}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Runs one command of `parser` (by default llamadist's; the benchmark, bench/mesh.py, brings
    its own) and turns its failure into one line."""
    try:
        args = (parser or build_parser()).parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(level=logging.INFO, format=TEXT_FORMAT)
    try:
        return args.run(args)
    except ClientError as err:  # the server's status and message
        return _fail(err, 1)
    except (ValueError, InvalidArgument, OSError, RuntimeError) as err:  # a refused value
        return _fail(err, 2)
    except LlamadistError as err:  # a service that cannot serve (no model, no stage)
        return _fail(err, 1)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug: still one line, the traceback on request
        if os.environ.get("LLAMADIST_DEBUG"):
            raise
        return _fail(f"unexpected {type(err).__name__}: {err} (LLAMADIST_DEBUG=1 shows where)", 1)


if __name__ == "__main__":
    sys.exit(main())
