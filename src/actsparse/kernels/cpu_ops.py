"""The C++ implementations of the `actsparse::` ops of `ops.py`, registered for CPU tensors.

`cpu_kernels.cpp` is a plain C ABI shared object (no torch headers, so it builds in about a second
and needs no ninja), compiled with ``-O3 -march=native`` at first use; `register()` (run on
import) makes these functions the "cpu" kernels of `actsparse::input_sparse_linear`,
`actsparse::output_sparse_rows` and `actsparse::dense_linear`, so a CPU decode step traces and compiles like a CUDA one (the
other ops run their torch reference on the CPU). Activations and outputs are of the model's
dtype, weights float32, bfloat16 or float16 (fp32 accumulation; the vector path, AVX-512, AVX2 or scalar, is
picked at run time: `isa()` says which, `set_isa` forces a lower one for tests); `set_threads`
picks the kernels' thread count (default 1).

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
_C = ctypes.c_int
_SIGNATURES = {  # name: (argument types, result type)
    "actsparse_input_sparse_ex": ((_P, _I, _I, _P, _P, _C, _P, _C, _I, _P, _P, _C, _C), _C),
    "actsparse_output_sparse_rows_ex": ((_P, _P, _I, _I, _I, _P, _P, _C, _P, _C, _C), _C),
    "actsparse_dense_rows": ((_P, _I, _I, _P, _C, _I, _P, _P, _C, _C), _C),
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


# The wrappers below run once per linear per decoded token: they stay lean (a decode step of
# SmolLM2 makes ~200 calls, so each microsecond here is ~0.2 ms a token).
def _code(t: torch.Tensor, what: str, dtype: torch.dtype | None = None) -> int:
    """The dtype code of a contiguous CPU tensor of a kernel dtype (of `dtype`, where given)."""
    code = DTYPE_CODES.get(t.dtype)
    if code is None or not t.is_cpu or not t.is_contiguous() or (dtype is not None and t.dtype != dtype):
        valid = "float32, bfloat16 or float16" if dtype is None else f"{dtype} (the activations' dtype)"
        raise ActSparseError(f"cpu kernels take contiguous {valid} CPU tensors; {what} is {t.dtype} on {t.device}")
    return code


def _fp32_ptr(t: torch.Tensor | None, keep: list) -> int | None:
    """The address of a bias, scale or threshold as the kernels read it: fp32 (a bf16 / fp16
    model's bias is widened per call, the copy held in `keep` until the call returns)."""
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_contiguous():
        t = t.float().contiguous()
        keep.append(t)
    return t.data_ptr()


def input_sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor | None,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    lowrank_b: torch.Tensor | None,
    lowrank_z: torch.Tensor | None,
    complement: bool,
    sparsity: float,
) -> torch.Tensor:
    """threshold None: every input row kept (the dense product over input-major weights)."""
    act, code = _code(x, "x"), _code(weight_t, "weight_t")
    batch, k = x.shape
    n = weight_t.shape[1]
    y = x.new_empty((batch, n))
    keep: list = []
    library().actsparse_input_sparse_ex(
        x.data_ptr(), batch, k, _fp32_ptr(scale, keep), _fp32_ptr(threshold, keep), int(complement),
        weight_t.data_ptr(), code, n, _fp32_ptr(bias, keep), y.data_ptr(), act, _THREADS,
    )
    if lowrank_b is not None:
        y.addmm_(lowrank_z.to(y.dtype), lowrank_b.T.to(y.dtype))
    return y


def output_sparse_rows(x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    act, code = _code(x, "x"), _code(weight, "weight")
    _code(a, "a", x.dtype)
    batch, d = x.shape
    j = weight.shape[0]
    m = x.new_empty((batch, j))
    keep: list = []
    library().actsparse_output_sparse_rows_ex(
        x.data_ptr(), a.data_ptr(), batch, j, d, _fp32_ptr(threshold, keep), weight.data_ptr(), code, m.data_ptr(),
        act, _THREADS,
    )
    return m


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` over an output-major weight, accumulated in fp32, in x's dtype."""
    act, code = _code(x, "x"), _code(weight, "weight")
    batch, d = x.shape
    j = weight.shape[0]
    y = x.new_empty((batch, j))
    keep: list = []
    library().actsparse_dense_rows(
        x.data_ptr(), batch, d, weight.data_ptr(), code, j, _fp32_ptr(bias, keep), y.data_ptr(), act, _THREADS
    )
    return y


def register() -> None:
    """Make these the "cpu" kernels of the `actsparse::` ops they implement."""
    ops.input_sparse_linear.register_kernel("cpu", input_sparse_linear)
    ops.output_sparse_rows.register_kernel("cpu", output_sparse_rows)
    ops.dense_linear.register_kernel("cpu", dense_linear)


register()
