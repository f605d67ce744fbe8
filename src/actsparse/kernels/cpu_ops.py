"""The CPU kernels of `cpu_kernels.cpp`, built with the system C++ compiler at first use.

The library is a plain C ABI shared object (no torch headers, so it builds in about a second and
needs no ninja), compiled with ``-O3 -march=native`` and cached under
``$ACTSPARSE_CACHE`` (default ``~/.cache/actsparse``) by a hash of the source, the flags, the
compiler and the CPU, so a changed source or another machine builds afresh. ``$CXX`` picks the
compiler (default g++). The ops have the semantics of `triton_ops.py`'s custom ops, on float32
CPU tensors.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import ActSparseError

MAX_BATCH = 8
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17")
_LIB: ctypes.CDLL | None = None

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "actsparse_input_sparse": (_P, _I, _I, _P, _P, ctypes.c_int, _P, _I, _P, _P),
    "actsparse_output_sparse_rows": (_P, _P, _I, _I, _I, _P, _P, _P),
}


def cache_dir() -> Path:
    root = os.environ.get("ACTSPARSE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actsparse"
    return Path(root) / "cpu-kernels"


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), platform.machine().encode(), _cpu_signature().encode()):
        digest.update(part)
    return cache_dir() / digest.hexdigest()[:16] / "libactsparse_cpu.so"


def build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"actsparse: building the CPU kernels with {compiler} (once, cached in {target.parent})", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise ActSparseError(f"building the CPU kernels with {compiler} failed:\n{result.stderr.strip()}")
        os.replace(tmp, target)  # atomic: a concurrent build leaves one whole library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise ActSparseError(
                f"the cpu backend compiles a small C++ kernel at first use and needs a C++ compiler; "
                f"{compiler!r} was not found (install g++, or set CXX)"
            )
        path = library_path(compiler)
        if not path.exists():
            build(compiler, path)
        lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
        _LIB = lib
    return _LIB


def _check(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        raise ActSparseError(f"cpu kernels take contiguous float32 CPU tensors; {what} is {t.dtype} on {t.device}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def input_sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    lowrank_b: torch.Tensor | None,
    lowrank_z: torch.Tensor | None,
    complement: bool,
) -> torch.Tensor:
    for t, what in ((x, "x"), (weight_t, "weight_t")):
        _check(t, what)
    batch, k = x.shape
    n = weight_t.shape[1]
    y = torch.empty((batch, n), dtype=torch.float32)
    library().actsparse_input_sparse(
        x.data_ptr(), batch, k, _ptr(scale), threshold.data_ptr(), int(complement),
        weight_t.data_ptr(), n, _ptr(bias), y.data_ptr(),
    )
    if lowrank_b is not None:
        y.addmm_(lowrank_z, lowrank_b.T)
    return y


def output_sparse_rows(x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    for t, what in ((x, "x"), (a, "a"), (weight, "weight")):
        _check(t, what)
    batch, d = x.shape
    j = weight.shape[0]
    m = torch.empty((batch, j), dtype=torch.float32)
    library().actsparse_output_sparse_rows(
        x.data_ptr(), a.data_ptr(), batch, j, d, threshold.data_ptr(), weight.data_ptr(), m.data_ptr()
    )
    return m
