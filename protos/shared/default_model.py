"""Where the embedded default model lives on this host (no torch, no download): the directory
every service defaults --model to. Making it is the client's job (client/default_model.py)."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_home() -> Path:
    return Path(os.environ.get("LLAMADIST_HOME", Path.home() / ".cache" / "llamadist"))


def default_model_dir() -> Path:
    return cache_home() / "models" / MODEL_NAME
