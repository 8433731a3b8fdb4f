"""TLS credentials and API keys for every llamadist link.

- Stages: TLS with a required client certificate signed by `--tls-ca` (mutual TLS). Only the
  orchestrator (or an admin holding a certificate of that CA) can call a stage.
- Orchestrator: TLS with `--tls-cert/--tls-key` toward clients (no client certificate asked);
  it presents the same certificate to the stages and verifies theirs against `--tls-ca`.
  Clients authenticate with API keys (`--api-keys-file`, metadata `authorization: Bearer <key>`).

API keys file: one key per line, `<key> <role>`, role `client` or `admin`; `#` starts a comment.
Clients may generate, end sessions, read the plan and the stages; plan changes (PreviewPlan,
ReloadPlan) and any RPC not listed as a client RPC need `admin`. Health needs no key, so that
container health checks work; it tells only whether the service is ready.

Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from protos.shared.serving import GRPC_OPTIONS
from protos.shared.standard_services import HEALTH_METHODS, REFLECTION_METHOD

log = logging.getLogger(__name__)

ROLES = ("client", "admin")
ORCHESTRATOR = "/llamadist.Orchestrator/"
# RPCs anyone may call, key or not: health probes (ours and grpc.health.v1), which rarely can
# send a key.
OPEN_METHODS = frozenset({ORCHESTRATOR + "Health"}) | HEALTH_METHODS
# RPCs a `client` key may call; every other RPC needs an `admin` key.
CLIENT_METHODS = frozenset(
    [
        ORCHESTRATOR + m
        for m in ("Generate", "GenerateStream", "EndSession", "GetPlan", "ListStages")
    ]
    + [REFLECTION_METHOD]  # grpcurl list / describe
)


# ---------------------------------------------------------------------- TLS


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise OSError(f"{flag} {path}: {err.strerror or err}") from None


def check_tls_flags(cert: str, key: str, ca: str) -> bool:
    """True when TLS is on. All three files or none: a service with TLS serves its certificate
    (cert, key) and verifies its peers (ca)."""
    given = [bool(cert), bool(key), bool(ca)]
    if any(given) and not all(given):
        raise ValueError("--tls-cert, --tls-key and --tls-ca go together (give all three or none)")
    return all(given)


def server_credentials(
    cert: str, key: str, ca: str, require_client_cert: bool
) -> grpc.ServerCredentials | None:
    """TLS server credentials from PEM files, or None (plaintext) when none are given. With
    `require_client_cert`, a peer must present a certificate that `ca` signed (mutual TLS)."""
    if not check_tls_flags(cert, key, ca):
        return None
    return grpc.ssl_server_credentials(
        [(_read(key, "--tls-key"), _read(cert, "--tls-cert"))],
        root_certificates=_read(ca, "--tls-ca") if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


def channel_credentials(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials that trust `ca` and, when given, present cert/key (needed toward
    stages); None (plaintext) without a CA."""
    if not ca:
        if cert or key:
            raise ValueError("a client certificate needs --tls-ca too")
        return None
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--tls-ca"),
        private_key=_read(key, "--tls-key") if key else None,
        certificate_chain=_read(cert, "--tls-cert") if cert else None,
    )


def channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """The one way we open a channel: TLS with `credentials` (channel_credentials), else
    plaintext, with our channel options (message limits, keepalive). A stage's callers wrap it
    in stage_auth.KeyedChannel to send the stage key; the client sends its API key per call."""
    if credentials is None:
        return grpc.insecure_channel(address, options=GRPC_OPTIONS)
    return grpc.secure_channel(address, credentials, options=GRPC_OPTIONS)


# ---------------------------------------------------------------------- API keys


def parse_api_keys(text: str, source: str = "API keys file") -> list[tuple[str, str]]:
    """(key, role) pairs from the file format above. Errors name the line, never the key."""
    keys: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ROLES:
            raise ValueError(f"{source} line {number}: expected '<key> <role>', role client|admin")
        if any(hmac.compare_digest(fields[0], k) for k, _ in keys):
            raise ValueError(f"{source} line {number}: the key is listed twice")
        keys.append((fields[0], fields[1]))
    if not keys:
        raise ValueError(f"{source} has no keys")
    return keys


def load_api_keys(path: str) -> list[tuple[str, str]]:
    return parse_api_keys(_read(path, "--api-keys-file").decode(), path)


def bearer_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries an API key (empty without one)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that refuses the call."""

    def refuse(request, context):
        context.abort(code, message)

    def refuse_stream(request_iterator, context):
        context.abort(code, message)

    serdes = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **serdes)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **serdes)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse_stream, **serdes)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **serdes)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Checks `authorization: Bearer <key>` on every call: missing or unknown key ->
    UNAUTHENTICATED; a client key on an admin RPC -> PERMISSION_DENIED."""

    def __init__(
        self,
        keys: Iterable[tuple[str, str]],
        open_methods: frozenset[str] = OPEN_METHODS,
        client_methods: frozenset[str] = CLIENT_METHODS,
    ):
        self.keys = [(k.encode(), role) for k, role in keys]
        self.open_methods = open_methods
        self.client_methods = client_methods

    def identify(self, metadata) -> tuple[str, str] | None:
        """(identity, role) of the call's key, or None for a missing or unknown key. The
        identity is derived from the key the header matched, never from the header's spelling
        (`Bearer K`, `bearer  K` and `BEARER K` are one client, one session cap): a hash, so the
        key is never kept in the clear. Every key is compared (constant time each)."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(value, str):
            return None
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        token_bytes = token.strip().encode()
        found = None
        for key, role in self.keys:
            if hmac.compare_digest(key, token_bytes):
                found = key, role
        if found is None:
            return None
        key, role = found
        return "key:" + hashlib.sha256(key).hexdigest()[:16], role

    def role(self, metadata) -> str | None:
        """The role of the call's key, or None."""
        identified = self.identify(metadata)
        return identified[1] if identified else None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method in self.open_methods:
            return handler
        role = self.role(details.invocation_metadata)
        if role is None:
            log.info("refused %s: missing or unknown API key", details.method)
            return denied(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown API key: send metadata 'authorization: Bearer <key>' "
                "(llamadist --api-key or LLAMADIST_API_KEY)",
            )
        if role != "admin" and details.method not in self.client_methods:
            log.info("refused %s: a %s key is not enough", details.method, role)
            return denied(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{details.method.rsplit('/', 1)[-1]} needs an admin API key",
            )
        return handler
