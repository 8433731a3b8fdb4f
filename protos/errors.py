"""Domain errors, raised by plain classes that know nothing of gRPC.

`protos.status` maps each to one gRPC status code; the message must say what to fix.
"""


class LlamadistError(Exception):
    """Base of every error that reaches a caller with a precise status."""


class InvalidArgument(LlamadistError):
    """The request is malformed or out of range."""


class NotFound(LlamadistError):
    """An unknown session (or other named thing)."""


class ResourceExhausted(LlamadistError):
    """A budget is spent: the KV cache is full."""


class Unauthenticated(LlamadistError):
    """The call carries no known credential (API key)."""


class PermissionDenied(LlamadistError):
    """The caller may not touch this (another API key's session)."""


class FailedPrecondition(LlamadistError):
    """The request is valid but the service is not in a state to serve it (wrong plan epoch,
    no layers loaded, no tokenizer)."""


class Unavailable(LlamadistError):
    """A stage cannot be reached; the message names it."""


class OutOfRange(LlamadistError):
    """A value left the range the model's dtype holds (NaN or Inf inside a stage)."""


class Cancelled(LlamadistError):
    """The session was ended while it ran."""
