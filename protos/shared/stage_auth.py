"""The stage key: the credential of the stage RPCs when TLS is off.

Every stage RPC but Health needs a credential: mutual TLS (protos/shared/security.py), or, on a
plaintext mesh, the stage key, a secret every stage and the orchestrator of one mesh read from
the same file (`--stage-key-file`). It is not a client API key: clients never call stages.
Callers send it as metadata `x-llamadist-stage-key: <key>` on every call, the streams between
stages included; a stage compares it in constant time and refuses a call without it (or with
another) with UNAUTHENTICATED, saying what to send. Health stays open, so that container health
checks work without the key; it tells only whether the stage is ready.

Over plaintext the key crosses the network as it is: it keeps out callers who cannot see the
mesh's traffic, not those who can (README "Security").

Key file: one line of at least MIN_KEY_CHARS printable characters (`make_stage_key` writes 64
hex digits, readable by the owner only). `python -m protos.shared.stage_auth FILE` makes one where
there is none (the compose file's stage-key service runs that).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from protos.shared.security import channel, denied
from protos.shared.standard_services import HEALTH_METHODS

log = logging.getLogger(__name__)

HEADER = "x-llamadist-stage-key"
MIN_KEY_CHARS = 16
# Stage RPCs anyone may call: the health probes.
OPEN_METHODS = frozenset({"/llamadist.Stage/Health"}) | HEALTH_METHODS
REFUSAL = (
    f"missing or wrong stage key: send metadata '{HEADER}: <key>' with the key of the mesh's "
    "--stage-key-file (env LLAMADIST_STAGE_KEY_FILE on a stage, "
    "LLAMADIST_ORCHESTRATOR_STAGE_KEY_FILE on the orchestrator), or call over mutual TLS"
)


# ---------------------------------------------------------------------- the key file


def parse_stage_key(text: str, source: str = "--stage-key-file") -> str:
    """The key a stage key file holds. Errors name the file, never the key."""
    key = text.strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(
            f"{source}: the stage key must be at least {MIN_KEY_CHARS} characters "
            "(`python -m protos.shared.stage_auth FILE` makes one)"
        )
    if not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"{source}: the stage key must be one word of printable characters")
    return key


def load_stage_key(path: str) -> str:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        problem = getattr(err, "strerror", None) or err
        raise ValueError(f"--stage-key-file {path}: {problem}") from None
    return parse_stage_key(text, f"--stage-key-file {path}")


def key_file_problem(path: str) -> str | None:
    """The knob check of --stage-key-file: '' (none) or a file holding a stage key."""
    if not path:
        return None
    try:
        load_stage_key(path)
    except ValueError as err:
        return str(err).removeprefix("--stage-key-file ")
    return None


def make_stage_key(path: str | Path) -> bool:
    """Writes a fresh key to `path` (owner-only) unless a file is there; True when it wrote
    one. An existing file is kept, so that every service of a mesh reads the same key."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return True


def key_env(directory: str | Path) -> dict[str, str]:
    """The environment that gives a mesh's stage and orchestrator processes one stage key (made
    in `directory` if none is there): for scripts that start them without flags of their own."""
    path = Path(directory) / "stage-key"
    make_stage_key(path)
    return {
        "LLAMADIST_STAGE_KEY_FILE": str(path),
        "LLAMADIST_ORCHESTRATOR_STAGE_KEY_FILE": str(path),
    }


# ---------------------------------------------------------------------- the stage's side


class StageKeyInterceptor(grpc.ServerInterceptor):
    """Lets a call through when its metadata carries the stage key (or it is a health probe)."""

    def __init__(self, key: str):
        self._key = key.encode()

    def holds_key(self, metadata) -> bool:
        sent = next((v for k, v in metadata or () if k == HEADER), None)
        return isinstance(sent, str) and hmac.compare_digest(sent.encode(), self._key)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        if self.holds_key(details.invocation_metadata):
            return handler
        log.info("refused %s: missing or wrong stage key", details.method)
        return denied(handler, grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


# ---------------------------------------------------------------------- the callers' side


class _Keyed:
    """A multi-callable of a stage channel whose every call carries the stage key."""

    def __init__(self, inner, metadata: tuple[tuple[str, str], ...]):
        self._inner, self._metadata = inner, metadata

    def _with_key(self, kwargs: dict) -> dict:
        return {**kwargs, "metadata": (*(kwargs.get("metadata") or ()), *self._metadata)}

    def __call__(self, request, **kwargs):
        return self._inner(request, **self._with_key(kwargs))

    def with_call(self, request, **kwargs):
        return self._inner.with_call(request, **self._with_key(kwargs))

    def future(self, request, **kwargs):
        return self._inner.future(request, **self._with_key(kwargs))


class KeyedChannel(grpc.Channel):
    """A channel whose calls all carry the stage key. Not grpc.intercept_channel: an
    intercepted channel registers each call anew, and doing so on a closed channel crashes the
    process (grpcio 1.85: SIGSEGV in _get_registered_call_handle, seen when a generation ended
    its session while its orchestrator closed); here a stub's methods are made once, as on a
    plain channel, and a call on a closed channel raises ValueError as there."""

    def __init__(self, channel: grpc.Channel, key: str):
        self._channel = channel
        self._metadata = ((HEADER, key),)

    def unary_unary(self, *args, **kwargs):
        return _Keyed(self._channel.unary_unary(*args, **kwargs), self._metadata)

    def unary_stream(self, *args, **kwargs):
        return _Keyed(self._channel.unary_stream(*args, **kwargs), self._metadata)

    def stream_unary(self, *args, **kwargs):
        return _Keyed(self._channel.stream_unary(*args, **kwargs), self._metadata)

    def stream_stream(self, *args, **kwargs):
        return _Keyed(self._channel.stream_stream(*args, **kwargs), self._metadata)

    def subscribe(self, callback, try_to_connect=False):
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        self._channel.unsubscribe(callback)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def stage_channel(
    address: str, tls: grpc.ChannelCredentials | None = None, key: str | None = None
) -> grpc.Channel:
    """A channel to a stage: mutual TLS with `tls` (security.channel_credentials), else
    plaintext; with `key`, every call carries the stage key."""
    plain = channel(address, tls)
    return plain if key is None else KeyedChannel(plain, key)


if __name__ == "__main__":  # python -m protos.shared.stage_auth FILE
    if len(sys.argv) != 2:
        sys.exit(
            "usage: python -m protos.shared.stage_auth FILE (writes a stage key there if none)"
        )
    made = make_stage_key(sys.argv[1])
    print(f"stage key {'made' if made else 'kept'}: {sys.argv[1]}")
