"""The CPU kernels of `cpu_kernels.cpp`, built with the system C++ compiler at first use.

The library is a plain C ABI shared object (no torch headers, so it builds in about a second and
needs no ninja), compiled with ``-O3 -march=native`` and cached under
``$ACTSPARSE_CACHE`` (default ``~/.cache/actsparse``) by a hash of the source, the flags, the
compiler and the CPU, so a changed source or another machine builds afresh. ``$CXX`` picks the
compiler (default g++). The ops have the semantics of `triton_ops.py`'s custom ops, on CPU
tensors: float32 activations, float32 / bfloat16 / float16 weights, float32 outputs (fp32
accumulation). `set_threads` picks the kernels' thread count (default 1), `set_isa` can force a
lower vector path (tests), `isa()` says which one runs.
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
_C = ctypes.c_int
_SIGNATURES = {  # name: (argument types, result type)
    "actsparse_input_sparse": ((_P, _I, _I, _P, _P, _C, _P, _I, _P, _P), None),
    "actsparse_output_sparse_rows": ((_P, _P, _I, _I, _I, _P, _P, _P), None),
    "actsparse_input_sparse_ex": ((_P, _I, _I, _P, _P, _C, _P, _C, _I, _P, _P, _C), _C),
    "actsparse_output_sparse_rows_ex": ((_P, _P, _I, _I, _I, _P, _P, _C, _P, _C), _C),
    "actsparse_dense_rows": ((_P, _I, _I, _P, _C, _I, _P, _P, _C), _C),
    "actsparse_cpu_isa": ((), _C),
    "actsparse_cpu_set_isa": ((_C,), _C),
}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ISA_NAMES = ("scalar", "avx2", "avx512")
_THREADS = 1


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
        for name, (argtypes, restype) in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = restype
        _LIB = lib
    return _LIB


def set_threads(threads: int) -> None:
    """Threads each kernel call uses (the caller's and threads-1 pooled ones)."""
    global _THREADS
    if threads < 1:
        raise ActSparseError(f"the cpu kernels need threads >= 1, got {threads}")
    _THREADS = threads


def isa() -> str:
    """The vector path the kernels run: "avx512", "avx2" or "scalar"."""
    return ISA_NAMES[library().actsparse_cpu_isa()]


def set_isa(name: str | None) -> str:
    """Force vector path `name` (one this CPU has), or the best one again with None."""
    if name is not None and name not in ISA_NAMES:
        raise ActSparseError(f"unknown cpu kernel path {name!r}; valid: {', '.join(ISA_NAMES)}")
    got = library().actsparse_cpu_set_isa(-1 if name is None else ISA_NAMES.index(name))
    if got < 0:
        raise ActSparseError(f"this CPU (or this build) cannot run the {name} kernels; it runs {isa()}")
    return ISA_NAMES[got]


def _check(t: torch.Tensor, what: str, weight: bool = False) -> None:
    ok = t.dtype in DTYPE_CODES if weight else t.dtype == torch.float32
    if t.device.type != "cpu" or not ok or not t.is_contiguous():
        valid = "float32, bfloat16 or float16" if weight else "float32"
        raise ActSparseError(f"cpu kernels take contiguous {valid} CPU tensors; {what} is {t.dtype} on {t.device}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def input_sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor | None,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    lowrank_b: torch.Tensor | None,
    lowrank_z: torch.Tensor | None,
    complement: bool,
) -> torch.Tensor:
    """threshold None: every input row kept (the dense product over input-major weights)."""
    _check(x, "x")
    _check(weight_t, "weight_t", weight=True)
    batch, k = x.shape
    n = weight_t.shape[1]
    y = torch.empty((batch, n), dtype=torch.float32)
    library().actsparse_input_sparse_ex(
        x.data_ptr(), batch, k, _ptr(scale), _ptr(threshold), int(complement),
        weight_t.data_ptr(), DTYPE_CODES[weight_t.dtype], n, _ptr(bias), y.data_ptr(), _THREADS,
    )
    if lowrank_b is not None:
        y.addmm_(lowrank_z, lowrank_b.T.to(torch.float32))
    return y


def output_sparse_rows(x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    for t, what in ((x, "x"), (a, "a")):
        _check(t, what)
    _check(weight, "weight", weight=True)
    batch, d = x.shape
    j = weight.shape[0]
    m = torch.empty((batch, j), dtype=torch.float32)
    library().actsparse_output_sparse_rows_ex(
        x.data_ptr(), a.data_ptr(), batch, j, d, threshold.data_ptr(), weight.data_ptr(),
        DTYPE_CODES[weight.dtype], m.data_ptr(), _THREADS,
    )
    return m


def dense_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in float32 over an output-major weight of any kernel dtype."""
    _check(x, "x")
    _check(weight, "weight", weight=True)
    batch, d = x.shape
    j = weight.shape[0]
    y = torch.empty((batch, j), dtype=torch.float32)
    library().actsparse_dense_rows(
        x.data_ptr(), batch, d, weight.data_ptr(), DTYPE_CODES[weight.dtype], j, _ptr(bias), y.data_ptr(), _THREADS
    )
    return y
