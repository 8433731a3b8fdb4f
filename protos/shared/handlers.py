"""Registers a servicer for one service of llamadist.proto, parsing each request ourselves.

grpc's generated registration lets the library deserialize requests, and bytes that are not a
valid message then come back as INTERNAL. Here they come back as INVALID_ARGUMENT saying which
message was expected, so no input a client can send yields INTERNAL.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from protos import llamadist_pb2 as pb
from protos.errors import InvalidArgument


def _parse(cls, raw: bytes, context: grpc.ServicerContext):
    try:
        return cls.FromString(raw)
    except (DecodeError, RuntimeError, ValueError) as err:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid llamadist.{cls.DESCRIPTOR.name} message: {err}",
        )


def _parsing(behavior: Callable, cls) -> Callable:
    if inspect.isgeneratorfunction(inspect.unwrap(behavior)):

        @functools.wraps(behavior)
        def stream(raw, context):
            yield from behavior(_parse(cls, raw, context), context)

        return stream

    @functools.wraps(behavior)
    def unary(raw, context):
        return behavior(_parse(cls, raw, context), context)

    return unary


def _parsing_stream(behavior: Callable, cls) -> Callable:
    """Request streams are parsed as they are read; a bad message raises InvalidArgument from
    the iterator (the servicer ends the stream with it)."""

    def parsed(raw_iterator):
        for raw in raw_iterator:
            try:
                yield cls.FromString(raw)
            except (DecodeError, RuntimeError, ValueError) as err:
                raise InvalidArgument(
                    f"the request is not a valid llamadist.{cls.DESCRIPTOR.name} message: {err}"
                ) from None

    @functools.wraps(behavior)
    def bidi(raw_iterator, context):
        return behavior(parsed(raw_iterator), context)

    return bidi


def add_service(server: grpc.Server, service_name: str, servicer: object) -> None:
    """Binds every rpc of `llamadist.<service_name>` to the servicer method of the same name."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_cls = GetMessageClass(method.input_type)
        serialize = GetMessageClass(method.output_type).SerializeToString
        behavior = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _parsing_stream(behavior, request_cls), response_serializer=serialize
            )
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _parsing_stream(behavior, request_cls), response_serializer=serialize
            )
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _parsing(behavior, request_cls), response_serializer=serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _parsing(behavior, request_cls), response_serializer=serialize
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
