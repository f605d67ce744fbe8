"""The C++ implementations of the `actsparse::` ops of `ops.py`, registered for CPU tensors.

`cpu_kernels.cpp` is a plain C ABI shared object (no torch headers, so it builds in about a second
and needs no ninja), compiled with ``-O3 -march=native`` at first use; `register()` (run on
import) makes these functions the "cpu" kernels of `actsparse::input_sparse_linear` and
`actsparse::output_sparse_rows`, so a CPU decode step traces and compiles like a CUDA one (the
other ops run their torch reference on the CPU). Float32 tensors only.

The library is cached under ``$ACTSPARSE_CACHE`` (default ``$XDG_CACHE_HOME/actsparse`` or
``~/.cache/actsparse``) by a hash of the source, the flags, the compiler's resolved path and
version, and the CPU. The cache is private: its folders are created 0700, and a library (or a
folder) not owned by the user, or writable by group or others, is never loaded: the library is
rebuilt, the folder refused. ``$CXX`` picks the compiler (default g++).
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
from . import ops
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


def resolved_compiler(compiler: str) -> str:
    """The compiler's real path (`compiler` as $CXX gives it: a name on PATH or a path)."""
    found = shutil.which(compiler)
    if found is None:
        raise ActSparseError(
            f"the cpu kernels are compiled at first use and need a C++ compiler; "
            f"{compiler!r} was not found (install g++, or set CXX)"
        )
    return os.path.realpath(found)


def library_path(compiler: str) -> Path:
    resolved = resolved_compiler(compiler)
    version = subprocess.run([resolved, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), resolved.encode(), version.encode(),
                 platform.machine().encode(), _cpu_signature().encode()):
        digest.update(part)
    return cache_dir() / digest.hexdigest()[:16] / "libactsparse_cpu.so"


def _private(path: Path) -> bool:
    """Owned by this user and writable by nobody else."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def private_dir(path: Path) -> None:
    """Create `path` and the cache folders above it 0700; refuse one someone else owns or can
    write to."""
    for folder in (cache_dir().parent, cache_dir(), path):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private(folder):
            raise ActSparseError(
                f"the cpu kernel cache {folder} is not private (it must be owned by you and not writable by "
                f"group or others): fix its permissions, or set ACTSPARSE_CACHE to a folder of your own"
            )


def trusted_library(path: Path) -> bool:
    """Whether `path` is a library this user built: a planted or loosened one is removed."""
    if not path.exists():
        return False
    if _private(path):
        return True
    path.unlink()
    return False


def build(compiler: str, target: Path) -> None:
    private_dir(target.parent)
    print(f"actsparse: building the CPU kernels with {compiler} (once, cached in {target.parent})", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise ActSparseError(f"building the CPU kernels with {compiler} failed:\n{result.stderr.strip()}")
        os.chmod(tmp, 0o700)  # the linker's mode follows the umask
        os.replace(tmp, target)  # atomic: a concurrent build leaves one whole library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        compiler = resolved_compiler(os.environ.get("CXX", "g++"))
        path = library_path(compiler)
        private_dir(path.parent)
        if not trusted_library(path):
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
    sparsity: float,
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


def output_sparse_rows(x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    for t, what in ((x, "x"), (a, "a"), (weight, "weight")):
        _check(t, what)
    batch, d = x.shape
    j = weight.shape[0]
    m = torch.empty((batch, j), dtype=torch.float32)
    library().actsparse_output_sparse_rows(
        x.data_ptr(), a.data_ptr(), batch, j, d, threshold.data_ptr(), weight.data_ptr(), m.data_ptr()
    )
    return m


def register() -> None:
    """Make these the "cpu" kernels of the `actsparse::` ops they implement."""
    ops.input_sparse_linear.register_kernel("cpu", input_sparse_linear)
    ops.output_sparse_rows.register_kernel("cpu", output_sparse_rows)


register()
