"""The quantized linear kernels of kernels/qlinear.c, compiled for this CPU at first use and
called through ctypes.

Measured on the 2-core AVX2 development machine (bench/CPU_NOTES.md), no kernel in torch reads
int8 or int4 weights faster than float32 while keeping float32 activations: torch's weight-only
int8 matmul is 3-4x slower than float32 there, and fbgemm's dynamic int8 rounds the activations
to int8 as well. So the weights are dequantized in registers by our own small C file.

The shared object is named by a hash of the source and flags. It is taken from the package's own
kernels/ folder where a wheel was built with it (docker/wheelhouse.sh builds it there, since the
image has no compiler), else built once into a cache directory (LLAMADIST_KERNEL_DIR, else
~/.cache/llamadist/kernels) with the system C compiler (`cc`, or CC). Where neither can be had
(no compiler, no AVX2/FMA/F16C, not x86-64 Linux), `load()` returns None with the reason and the
callers fall back to torch on dequantized weights: the same results, far slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
SOURCES = (KERNELS / "qlinear.c", KERNELS / "layer.c")
HEADERS = (KERNELS / "formats.h",)  # included by the sources: part of the library's name
# ISO C (-std=c11): no FMA contraction or float reordering of the compiler's own, which the
# batch-invariant mode relies on (kernels/qlinear.c).
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", "-std=c11")
# What f_linear can run, by kernel_isa's numbers (qlinear.c): picked at run time by the CPU.
ISAS = ("avx2", "avx512")
# Matrix formats of kernels/layer.c's QMat, and activation dtypes (F32, BF16, F16) for it.
FORMATS = {"int8": 0, "int4": 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}

_P = ctypes.c_void_p
_I = ctypes.c_int64


class Kernels:
    """Typed entry points of the shared object; tensors must be contiguous, on the CPU."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self._q8 = _fn(lib.q8_linear, _P, _I, _I, _P, _I, _P, _P, _P, _I, ctypes.c_int)
        self._q4 = _fn(lib.q4_linear, _P, _I, _I, _P, _I, _P, _P, _P, _P, _I, _P, ctypes.c_int)
        self._q4_dequant = _fn(lib.q4_dequant, _P, _I, _P, _P, _I, _I, _I, _P)
        self._f = _fn(lib.f_linear, _P, _I, _I, _P, _I, _P, _P, _I, ctypes.c_int)
        self._isa = lib.kernel_isa
        self._isa.argtypes, self._isa.restype = [ctypes.c_int], ctypes.c_int
        self.isa = ISAS[self._isa(-1)]  # the best this CPU has
        self.layer_rows = _fn(
            lib.layer_rows,
            ctypes.POINTER(LayerArgs), _P, _I, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int,
        )  # fmt: skip
        self.head_rows = _fn(
            lib.head_rows,
            _P, _I, _I, _P, ctypes.c_float, _I, ctypes.POINTER(QMat), _P, _P, ctypes.c_int,
        )  # fmt: skip

    def use_isa(self, name: str | None) -> str:
        """Makes f_linear and q8_linear run `name` (ISAS; None: the best this CPU has) where the
        CPU has it; returns the one in force. Every choice gives the same bits (qlinear.c)."""
        self.isa = ISAS[self._isa(-1 if name is None else ISAS.index(name))]
        return self.isa

    def f_linear(self, x, w, bias, y) -> None:
        """y[M, N] = x[M, K] @ W.T + bias for a packed float32, bfloat16 or float16 matrix
        (packed.PackedFloat; float32 x, y, bias), each output's sum in an order fixed whatever M
        is."""
        rows, k = x.shape
        self._f(
            x.data_ptr(), rows, k, w.data.data_ptr(), FORMATS[w.dtype], _ptr(bias), y.data_ptr(),
            y.shape[1], torch.get_num_threads(),
        )  # fmt: skip

    def q8_linear(self, x, data, group: int, scale, bias, y) -> None:
        """y[M, N] = x[M, K] @ W.T + bias for int8 weights `data` (layout: qlinear.c)."""
        rows, k = x.shape
        self._q8(
            x.data_ptr(), rows, k, data.data_ptr(), group, scale.data_ptr(), _ptr(bias),
            y.data_ptr(), y.shape[1], torch.get_num_threads(),
        )  # fmt: skip

    def q4_linear(self, x, data, group: int, scale, mins, bias, y) -> None:
        rows, k = x.shape
        sums = torch.empty(rows, scale.shape[1])  # each row's sum of x over each group
        self._q4(
            x.data_ptr(), rows, k, data.data_ptr(), group, scale.data_ptr(), mins.data_ptr(),
            _ptr(bias), y.data_ptr(), y.shape[1], sums.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip

    def q4_dequant(self, data, group: int, scale, mins, k: int, b0: int, b1: int, out) -> None:
        """Blocks [b0, b1) of 16 channels as float32 into out [K, 16 * (b1 - b0)]."""
        self._q4_dequant(
            data.data_ptr(), group, scale.data_ptr(), mins.data_ptr(), k, b0, b1, out.data_ptr()
        )


class QMat(ctypes.Structure):
    """A quantized matrix for layer.c (pointers into tensors its owner keeps alive)."""

    _fields_ = [
        ("format", _I), ("n", _I), ("k", _I), ("group", _I),
        ("data", _P), ("scale", _P), ("mins", _P), ("bias", _P),
    ]  # fmt: skip


class LayerArgs(ctypes.Structure):
    _fields_ = [
        ("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("inter", _I),
        ("act", _I),
        ("eps", ctypes.c_float), ("norm1", _P), ("norm2", _P), ("q_norm", _P), ("k_norm", _P),
        ("qkv", QMat), ("o", QMat), ("gate_up", QMat), ("down", QMat),
    ]  # fmt: skip


def _fn(f, *argtypes):
    f.argtypes = list(argtypes)
    f.restype = None
    return f


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cache_dir() -> Path:
    root = os.environ.get("LLAMADIST_KERNEL_DIR")
    return Path(root) if root else Path.home() / ".cache" / "llamadist" / "kernels"


def library_name() -> str:
    digest = hashlib.sha256(
        b"".join(s.read_bytes() for s in (*SOURCES, *HEADERS)) + " ".join(FLAGS).encode()
    )
    return f"qlinear-{digest.hexdigest()[:16]}.so"


def build(out: Path) -> None:
    """Compiles the kernels into `out` (a file path)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH; set CC to one")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        errors = ""
        for extra in (("-fopenmp",), ()):  # OpenMP where the compiler has it, else one thread
            cmd = [compiler, *FLAGS, *extra, *map(str, SOURCES), "-o", str(target), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(target, out)  # atomic: a concurrent start sees all of it or none
                return
            errors = done.stderr.strip()[-500:]
        raise RuntimeError(f"{compiler} failed: {errors}")


@cache
def load() -> tuple[Kernels | None, str]:
    """The kernels and the instruction set they run (ISAS), or None and why they are not
    there."""
    if platform.machine() not in ("x86_64", "AMD64") or platform.system() != "Linux":
        return None, f"no quantized kernels for {platform.system()}/{platform.machine()}"
    missing = {"avx2", "fma", "f16c"} - cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    shipped = KERNELS / library_name()
    path = shipped if shipped.exists() else cache_dir() / library_name()
    try:
        if not path.exists():
            build(path)
        kernels = Kernels(ctypes.CDLL(str(path)), path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("quantized CPU kernels unavailable (%s): falling back to torch", err)
        return None, f"could not build the kernels in {KERNELS}: {err}"
    return kernels, kernels.isa  # the instruction set its kernels run (ISAS)


if __name__ == "__main__":  # python -m stage_service.cpu_kernels DIR: build into DIR
    import sys

    build(Path(sys.argv[1]) / library_name())
