"""`llamadist generate` (one prompt, streamed or as one JSON line) and `llamadist chat`
(interactive, keeps the conversation)."""

from __future__ import annotations

import argparse
import json
import sys

from client import server_flags
from protos.limits import DEFAULT_MAX_NEW_TOKENS
from protos.sampling import SPECULATE_MODES, Sampling
from protos.shared.knob_checks import non_negative, positive
from protos.shared.knobs import checked


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=checked(int, positive),
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"most tokens to generate (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument(
        "--temperature", type=checked(float, non_negative), default=0.0, help="0 = greedy"
    )


def _sampling(a: argparse.Namespace) -> Sampling:
    """The sampling parameters, refused here as the server would refuse them (protos.sampling)."""
    return Sampling(
        temperature=a.temperature,
        top_k=getattr(a, "top_k", 0),
        top_p=getattr(a, "top_p", 1.0),
        repetition_penalty=getattr(a, "repetition_penalty", 1.0),
        seed=getattr(a, "seed", None),
    )


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    server_flags.add_arguments(p)
    p.add_argument("prompt", help="the prompt")
    _sampling_arguments(p)
    p.add_argument("--top-k", type=checked(int, non_negative), default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=checked(int, non_negative), default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence")
    p.add_argument("--chat", action="store_true", help="apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument(
        "--speculate",
        choices=SPECULATE_MODES,
        default="",
        help="speculative decoding for this request (exact either way): off, lookup (n-gram "
        "drafts from the prompt and text), draft (the orchestrator's --draft-model); default: "
        "the orchestrator's --speculate",
    )


def run_generate(a: argparse.Namespace) -> int:
    s = _sampling(a)
    kwargs = dict(
        max_new_tokens=a.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        repetition_penalty=s.repetition_penalty,
        seed=s.seed,
        stop=a.stop,
        ignore_eos=a.ignore_eos,
        speculate=a.speculate,
    )
    if a.chat:
        kwargs["messages"] = [{"role": "user", "content": a.prompt}]
    else:
        kwargs["prompt"] = a.prompt
    with server_flags.connect(a) as client:
        if a.json:
            result = client.generate(**kwargs)
            out = {
                "text": result.text,
                "token_ids": result.token_ids,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "timings": result.timings,
            }
            print(json.dumps(out))
            return 0
        for piece in client.stream(**kwargs):
            print(piece.text, end="", flush=True)
        print()
    return 0


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    server_flags.add_arguments(p)
    _sampling_arguments(p)
    p.set_defaults(temperature=None)  # the model's own sampling defaults unless given
    p.add_argument("--system", default=None, help="a system message")


def run_chat(a: argparse.Namespace) -> int:
    """Samples as the model's generation_config.json says unless --temperature is given
    (--temperature 0: greedy)."""
    if a.temperature is not None:
        _sampling(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    with server_flags.connect(a) as client:
        client.wait_ready(10)  # it answers; give a mesh that is starting a moment
        print("llamadist chat: empty line or Ctrl-D to quit", file=sys.stderr)
        while True:
            try:
                question = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not question:
                return 0
            messages.append({"role": "user", "content": question})
            answer = []
            print("assistant> ", end="", flush=True)
            sampling = {"temperature": a.temperature} if a.temperature is not None else {
                "temperature": None, "top_k": None, "top_p": None, "repetition_penalty": None,
            }  # fmt: skip
            for piece in client.chat_stream(messages, max_new_tokens=a.max_new_tokens, **sampling):
                answer.append(piece.text)
                print(piece.text, end="", flush=True)
            print()
            messages.append({"role": "assistant", "content": "".join(answer)})
