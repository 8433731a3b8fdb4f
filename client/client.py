"""The Python client: everything a user does with a running mesh, over gRPC to the orchestrator.

from client import Client
with Client("127.0.0.1:50051") as c:
    print(c.generate("What is the capital of France?", chat=True).text)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from protos import llamadist_pb2 as pb
from protos import llamadist_pb2_grpc as pb_grpc
from protos.limits import DEFAULT_MAX_NEW_TOKENS
from protos.shared.security import bearer_metadata, channel, channel_credentials

FINISH_NAMES = {pb.EOS: "eos", pb.LENGTH: "length", pb.STOP: "stop"}


class ClientError(Exception):
    """A failed call: the gRPC status code name and the server's message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Completion:
    """A whole generation, or one streamed piece of it (finish_reason is "" until the last)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    timings: dict = field(default_factory=dict)
    session_id: str = ""
    prompt_tokens: int = 0


def _dict(msg) -> dict:
    return MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _channel(address: str, tls_ca, tls_cert, tls_key) -> grpc.Channel:
    creds = channel_credentials(
        str(tls_ca) if tls_ca else None,
        str(tls_cert) if tls_cert else None,
        str(tls_key) if tls_key else None,
    )
    return channel(address, creds)


class Client:
    def __init__(
        self,
        address: str,
        timeout_s: float | None = None,
        *,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        api_key: str | None = None,
    ):
        """`tls_ca`: PEM file of the CA that signed the server's certificate (TLS; None =
        plaintext); `tls_cert`/`tls_key`: an optional client certificate; `api_key`: sent as
        `authorization: Bearer <key>` on every call."""
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = bearer_metadata(api_key)
        self.channel = _channel(address, tls_ca, tls_cert, tls_key)
        self.stub = pb_grpc.OrchestratorStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout_s: float | None = None):
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            raise ClientError(err.code().name, err.details() or "") from None

    # ------------------------------------------------------------------ health

    def health(self) -> tuple[bool, str]:
        reply = self._call(self.stub.Health, pb.HealthRequest(), timeout_s=5)
        return reply.status == pb.HealthReply.SERVING, reply.detail

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.2) -> None:
        """Polls Health until SERVING; raises ClientError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        detail = "no answer"
        while time.monotonic() < deadline:
            try:
                ok, detail = self.health()
                if ok:
                    return
            except ClientError as err:
                detail = str(err)
            time.sleep(poll_s)
        raise ClientError(
            "DEADLINE_EXCEEDED", f"{self.address} not ready after {timeout_s}s: {detail}"
        )

    # ------------------------------------------------------------------ generation

    @staticmethod
    def request(
        prompt: str | None = None,
        *,
        token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float | None = 0.0,
        top_k: int | None = 0,
        top_p: float | None = 1.0,
        repetition_penalty: float | None = 1.0,
        seed: int | None = None,
        stop: list[str] | tuple[str, ...] = (),
        ignore_eos: bool = False,
        session_id: str = "",
        speculate: str = "",
    ) -> pb.GenerateRequest:
        """Exactly one of prompt, token_ids, messages (a chat). speculate: off, lookup or draft
        ('' = the orchestrator's default)."""
        if sum(x is not None for x in (prompt, token_ids, messages)) != 1:
            raise ValueError("give exactly one of prompt, token_ids, messages")
        given = dict(
            temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed,
        )  # fmt: skip
        req = pb.GenerateRequest(
            max_new_tokens=max_new_tokens,
            # None leaves a field unset: the model's own default (generation_config.json)
            sampling=pb.SamplingParams(**{k: v for k, v in given.items() if v is not None}),
            stop=list(stop),
            ignore_eos=ignore_eos,
            session_id=session_id,
            speculate=speculate,
        )
        if prompt is not None:
            req.prompt = prompt
        elif token_ids is not None:
            req.token_ids.ids.extend(token_ids)
        else:
            req.chat.messages.extend(pb.ChatMessage(**m) for m in messages)
        return req

    def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        reply = self._call(self.stub.Generate, self.request(prompt, **kwargs))
        return Completion(
            text=reply.text,
            token_ids=list(reply.token_ids),
            logprobs=list(reply.logprobs),
            finish_reason=FINISH_NAMES.get(reply.finish_reason, ""),
            timings=_dict(reply.timings),
            session_id=reply.session_id,
            prompt_tokens=reply.prompt_tokens,
        )

    def stream(self, prompt: str | None = None, **kwargs) -> Iterator[Completion]:
        """Yields pieces as tokens arrive; the last has finish_reason and timings."""
        calls = self.stub.GenerateStream(
            self.request(prompt, **kwargs), timeout=self.timeout_s, metadata=self.metadata
        )
        try:
            for chunk in calls:
                yield Completion(
                    text=chunk.text,
                    token_ids=list(chunk.token_ids),
                    logprobs=list(chunk.logprobs),
                    finish_reason=FINISH_NAMES.get(chunk.finish_reason, ""),
                    timings=_dict(chunk.timings) if chunk.HasField("timings") else {},
                    session_id=chunk.session_id,
                )
        except grpc.RpcError as err:
            raise ClientError(err.code().name, err.details() or "") from None
        finally:
            calls.cancel()

    def chat(self, messages: list[dict[str, str]], **kwargs) -> Completion:
        return self.generate(messages=messages, **kwargs)

    def chat_stream(self, messages: list[dict[str, str]], **kwargs) -> Iterator[Completion]:
        return self.stream(messages=messages, **kwargs)

    def end_session(self, session_id: str) -> int:
        reply = self._call(self.stub.EndSession, pb.EndSessionRequest(session_id=session_id))
        return reply.freed_bytes

    # ------------------------------------------------------------------ plan and stages

    def plan(self) -> dict:
        return _dict(self._call(self.stub.GetPlan, pb.GetPlanRequest(), timeout_s=10))

    def preview_plan(self, **spec) -> dict:
        """The plan `spec` would make (strategy, num_partitions, max_memory, boundaries, stages);
        nothing changes."""
        return _dict(self._call(self.stub.PreviewPlan, pb.PlanRequest(**spec), timeout_s=60))

    def reload_plan(self, **spec) -> dict:
        """Applies a new plan while serving (same fields as preview_plan)."""
        return _dict(self._call(self.stub.ReloadPlan, pb.PlanRequest(**spec), timeout_s=900))

    def stages(self) -> list[dict]:
        reply = self._call(self.stub.ListStages, pb.ListStagesRequest(), timeout_s=30)
        return [_dict(s) for s in reply.stages]


def stage_health(
    address: str,
    timeout_s: float = 5.0,
    *,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> tuple[bool, str]:
    """Asks a stage's Health: (serving, detail). Raises ClientError when it does not answer.
    A stage with TLS asks for a client certificate its CA signed (tls_cert, tls_key)."""
    with _channel(address, tls_ca, tls_cert, tls_key) as channel:
        try:
            reply = pb_grpc.StageStub(channel).Health(pb.HealthRequest(), timeout=timeout_s)
        except grpc.RpcError as err:
            raise ClientError(err.code().name, err.details() or "") from None
    return reply.status == pb.HealthReply.SERVING, reply.detail
