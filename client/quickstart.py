"""`make run`: fetch the default model, start a 2-stage mesh on loopback, ask one question
through the orchestrator, stream the answer, stop the mesh."""

from __future__ import annotations

import sys

from client.client import Client
from client.default_model import fetch_default
from client.launcher import LocalMesh

QUESTION = "What is the capital of France?"


def main() -> int:
    model = fetch_default()
    with LocalMesh(str(model), num_stages=2) as mesh:
        print(f"mesh ready at {mesh.address} (logs in {mesh.log_dir})", file=sys.stderr)
        print(f"Q: {QUESTION}\nA: ", end="", flush=True)
        with Client(mesh.address) as client:
            for piece in client.chat_stream([{"role": "user", "content": QUESTION}]):
                print(piece.text, end="", flush=True)
                if piece.finish_reason:
                    t = piece.timings
                    print(
                        f"\n[{piece.finish_reason}; first token {t['ttft_ms']:.0f} ms, "
                        f"{t['decode_tokens_per_s']:.1f} tok/s]",
                        file=sys.stderr,
                    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
