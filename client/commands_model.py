"""`llamadist model fetch-default` (the embedded default model) and `llamadist certs`
(a development CA, certificates and API keys)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from protos.knobs import checked, positive


def _writable_target(path: str) -> None:
    """The nearest existing folder on the way to `path` must be a folder this process may
    write in (checked before minutes of installing and converting)."""
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"--dir {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--dir {path}: cannot write in {existing}")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model_command", required=True)
    fetch = sub.add_parser("fetch-default", help="install and convert SmolLM2-135M-Instruct")
    fetch.add_argument("--dir", default=None, help="target directory (default: the cache)")


def run_model(a: argparse.Namespace) -> int:
    from client.default_model import fetch_default

    if a.dir:
        _writable_target(a.dir)
    print(fetch_default(a.dir))
    return 0


def add_certs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for the PEM files")
    p.add_argument(
        "--hosts",
        action="append",
        default=[],
        help="more names or IP addresses for the server certificate, comma-separated, "
        "repeatable (localhost, 127.0.0.1 and ::1 are always in)",
    )
    p.add_argument("--days", type=checked(int, positive), default=365, help="validity")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.add_argument(
        "--api-keys",
        action="store_true",
        help="also write OUT/api-keys with a fresh client and admin key "
        "(and each key alone in api-keys.client, api-keys.admin)",
    )


def run_certs(a: argparse.Namespace) -> int:
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
