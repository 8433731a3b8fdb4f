"""The one place where errors become gRPC status codes, and back.

Servicer methods are wrapped with `grpc_errors`: a `LlamadistError` aborts the call with its code;
anything else is logged with its traceback and answered INTERNAL, so no input crashes a service.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import grpc

from protos import errors

log = logging.getLogger(__name__)

CODES: dict[type[errors.LlamadistError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
ERRORS: dict[grpc.StatusCode, type[errors.LlamadistError]] = {v: k for k, v in CODES.items()}


def code_of(exc: errors.LlamadistError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, errors.LlamadistError):
        context.abort(code_of(exc), str(exc))
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {exc!r}")


def grpc_errors(method: Callable) -> Callable:
    """Wraps a servicer method (unary or server-streaming) so that errors map to status codes."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
                _abort(context, exc, method.__name__)

        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            _abort(context, exc, method.__name__)

    return unary_wrapper


def from_rpc_error(err: grpc.RpcError, where: str) -> errors.LlamadistError:
    """A domain error for a failed call to `where` (a stage), keeping its code where it has one.
    Transport failures become Unavailable naming `where`."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = err.details() if hasattr(err, "details") else str(err)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.Unavailable(f"{where} is unreachable ({code.name}): {detail}")
    cls = ERRORS.get(code)
    if cls is None:
        return errors.LlamadistError(f"{where} failed ({code.name}): {detail}")
    return cls(f"{where}: {detail}")
