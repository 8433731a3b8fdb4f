"""The OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`),
served by the orchestrator process itself on `--http-port`, so no hop is added: a request runs
through the same Generator as the gRPC Generate call.

Starlette on uvicorn: the ASGI toolkit FastAPI is built on, without FastAPI's request models,
whose validation errors (422, their own body shape) are not OpenAI's; requests are checked here
and refused with OpenAI-shaped error bodies and the HTTP status matching our gRPC status.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import grpc
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from orchestrator.generation import Caller, Chunk
from orchestrator.metrics import CONTENT_TYPE
from orchestrator.openai_fields import INT32_MAX, boolean, integer, number, shown
from orchestrator.openai_responses import CompletionBuilder
from orchestrator.orchestrator import Orchestrator
from orchestrator.session_state import GenerationRequest
from protos import errors
from protos import llamadist_pb2 as pb
from protos.shared.security import ApiKeyInterceptor
from protos.status import code_of

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
# HTTP status and OpenAI error type per gRPC status (protos/status.py maps our errors to those).
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


class HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def error_response(err: Exception) -> JSONResponse:
    if isinstance(err, HttpError):
        status, kind, code = err.status, err.kind, err.code
    elif isinstance(err, errors.LlamadistError):
        status, kind = HTTP_OF.get(code_of(err), (500, "server_error"))
        code = type(err).__name__
    else:
        status, kind, code = 500, "server_error", None
        err = Exception(f"internal error: {err!r}")
    body = {"error": {"message": str(err), "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


class OpenAIApi:
    def __init__(
        self,
        orch: Orchestrator,
        keys: ApiKeyInterceptor | None = None,
        max_body_mb: int = 8,
    ):
        self.orch = orch
        self.keys = keys
        self.max_body_mb = max_body_mb  # --http-max-body-mb
        self.model_id = orch.model_dir.name
        self.created = int(time.time())

    # ---------------------------------------------------------------- plumbing

    def app(self) -> Starlette:
        routes = [
            Route("/v1/models", self._wrap(self.models), methods=["GET"]),
            Route("/v1/chat/completions", self._wrap(self.chat), methods=["POST"]),
            Route("/v1/completions", self._wrap(self.completions), methods=["POST"]),
            Route("/metrics", self._wrap(self.metrics), methods=["GET"]),
        ]
        return Starlette(routes=routes)

    def _wrap(self, handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as err:  # noqa: BLE001 - every error gets an OpenAI-shaped body
                return error_response(err)

        return endpoint

    def _caller(self, request: Request) -> Caller:
        """As the gRPC side: the API key (hashed) with keys, else the client's host."""
        if self.keys is None:
            host = request.client.host if request.client else ""
            return Caller("host:" + host, owns_all=True)
        identified = self.keys.identify((("authorization", request.headers.get("authorization")),))
        if identified is None:
            log.info("refused %s: missing or unknown API key", request.url.path)
            raise errors.Unauthenticated(
                "missing or unknown API key: send the header 'Authorization: Bearer <key>'"
            )
        key_id, role = identified
        return Caller(key_id, owns_all=role == "admin")

    async def _read(self, request: Request) -> bytes:
        """The body, refused 413 as soon as it is known to be over --http-max-body-mb: by its
        Content-Length before a byte is read, else while it arrives."""
        limit = self.max_body_mb * 2**20
        too_large = HttpError(
            413,
            "invalid_request_error",
            f"the request body is over {self.max_body_mb} MiB, the most this server reads "
            "(--http-max-body-mb); send a shorter prompt",
            "request_too_large",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        return b"".join(parts)

    async def _body(self, request: Request) -> dict:
        raw = await self._read(request)
        try:
            body = json.loads(raw or b"{}")
        except RecursionError:
            raise errors.InvalidArgument(
                "the request body is nested too deeply to parse (arrays or objects in each other)"
            ) from None
        except ValueError as err:
            raise errors.InvalidArgument(f"the request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise errors.InvalidArgument("the request body must be a JSON object")
        model = body.get("model")
        if model not in (None, self.model_id):
            raise HttpError(
                404,
                "invalid_request_error",
                f"the model {model!r} does not exist; this server serves {self.model_id!r}",
                "model_not_found",
            )
        return body

    # ---------------------------------------------------------------- requests

    def _generation(self, body: dict, prompt_ids: list[int]) -> GenerationRequest:
        n = body.get("n", 1)
        if n != 1:
            raise errors.InvalidArgument(f"n must be 1 (one choice per request), got {n!r}")
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = integer(body, name, 1, INT32_MAX)
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise errors.InvalidArgument("stop must be a string or a list of strings")
        # What the request leaves out: the model's defaults, else OpenAI's (temperature 1).
        sampling = self.orch.with_defaults(pb.SamplingParams())
        for name, openai_default in OPENAI_SAMPLING.items():
            value = integer(body, name, 0, INT32_MAX) if name == "top_k" else number(body, name)
            if value is not None:
                setattr(sampling, name, value)
            elif not sampling.HasField(name):
                setattr(sampling, name, openai_default)
        seed = integer(body, "seed", 0, 2**64 - 1)
        if seed is not None:
            sampling.seed = seed
        return GenerationRequest(
            prompt_ids=prompt_ids, max_new_tokens=max_tokens, sampling=sampling, stop=tuple(stop)
        )

    def _chat_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise errors.InvalidArgument("messages must be a non-empty list")
        chat = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise errors.InvalidArgument("each message needs a role and content")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                parts = [p.get("text") for p in content if isinstance(p, dict)]
                if not all(isinstance(t, str) for t in parts) or len(parts) != len(content):
                    raise errors.InvalidArgument("message content parts must be text parts")
                content = "".join(parts)
            if not isinstance(content, str):
                raise errors.InvalidArgument("message content must be a string or text parts")
            role = "system" if m["role"] == "developer" else m["role"]
            chat.append({"role": role, "content": content})
        return self.orch.tokenizer.encode_chat(chat, self.orch.generator.max_positions)

    def _prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]  # one prompt in a list
        if isinstance(prompt, str):
            return self.orch.tokenizer.encode(prompt, self.orch.generator.max_positions)
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return list(prompt)
        raise errors.InvalidArgument("prompt must be a string, or a list of token ids")

    def _run(self, req: GenerationRequest, caller: Caller, cancelled: threading.Event):
        return self.orch.generator.run(req, caller, cancelled)

    # ---------------------------------------------------------------- endpoints

    async def models(self, request: Request) -> Response:
        self._caller(request)
        view = self.orch.view
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_id,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "llamadist",
                        "context_length": view.max_context if view else None,
                        "plan_epoch": view.plan.epoch if view else None,
                    }
                ],
            }
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus exposition (orchestrator/metrics.py); no key, as scrapers have none."""
        body = await run_in_threadpool(self.orch.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        caller = self._caller(request)  # a refused key is logged, not counted (as on gRPC)
        with self.orch.metrics.refusals():
            self.orch.require_ready()
            body = await self._body(request)
            ids = await run_in_threadpool(self._chat_ids if chat else self._prompt_ids, body)
            req = self._generation(body, ids)
            builder, usage, stream = self._response_options(body, chat)
        cancelled = threading.Event()
        if stream:
            chunks = self._run(req, caller, cancelled)
            # The first chunk before the response starts: a refused request (its length, the
            # client's session cap, no stages) gets its own status, not an event in a 200.
            try:
                first = await run_in_threadpool(next, chunks, None)
            except BaseException:
                cancelled.set()
                raise
            return StreamingResponse(
                self._sse(first, chunks, builder, usage, cancelled), media_type="text/event-stream"
            )
        chunks = await run_in_threadpool(lambda: list(self._run(req, caller, cancelled)))
        return JSONResponse(builder.whole(chunks))

    def _response_options(self, body: dict, chat: bool) -> tuple[CompletionBuilder, bool, bool]:
        """What the response carries: (its builder, usage at the end of a stream, stream)."""
        if chat:
            want_logprobs = bool(boolean(body, "logprobs"))
        elif isinstance(body.get("logprobs"), bool):  # completions: as chat takes it, too
            want_logprobs = body["logprobs"]
        else:  # completions: the number of alternatives per token (0 = the chosen one only)
            want_logprobs = integer(body, "logprobs", 0, 20) is not None
        builder = CompletionBuilder(chat, self.model_id, want_logprobs, self.orch.tokenizer.decode)
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise errors.InvalidArgument(
                f'stream_options must be an object such as {{"include_usage": true}}, '
                f"got {shown(stream_options)}"
            )
        usage = bool(boolean(stream_options or {}, "include_usage", "stream_options."))
        return builder, usage, bool(boolean(body, "stream"))

    async def _sse(
        self, first, chunks: Iterator[Chunk], builder: CompletionBuilder, usage: bool, cancelled
    ):
        """Server-sent events. A client that goes away ends this generator: the generation is
        cancelled and closed, which ends its session on the stages at once."""
        try:
            yield builder.sse(builder.opening())
            last = first
            if first is not None:
                yield builder.sse(builder.piece(first))
            async for chunk in iterate_in_threadpool(chunks):
                last = chunk
                yield builder.sse(builder.piece(chunk))
            if usage and last is not None:
                yield builder.sse(builder.usage_chunk(last))
            yield "data: [DONE]\n\n"
        except Exception as err:  # noqa: BLE001 - mid-stream: an error event, then the end
            body = json.loads(error_response(err).body)
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            cancelled.set()
            await run_in_threadpool(_close, chunks)


def _close(chunks, timeout_s: float = 60.0) -> None:
    """Closes a generation's iterator, which runs its cleanup (the session ends on the stages).
    A step still running in another thread is waited for (it returns at the next token)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            chunks.close()
            return
        except ValueError:  # "generator already executing": its step is still in flight
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
