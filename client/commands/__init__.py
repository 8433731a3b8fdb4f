"""The `llamadist` subcommands, each with its flags next to its runner: `add_arguments(parser)`
declares them, `run(args) -> exit code` carries the command out (as client/bench.py does).
client/cli.py holds only the table of commands and the error handling."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
