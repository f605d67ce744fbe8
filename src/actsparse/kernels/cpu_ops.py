"""The C++ kernels of the `actsparse::` ops (`ops.py`) for CPU tensors.

`cpu_kernels.cpp` holds the kernels behind a plain C ABI (no torch headers); `cpu_torch_ops.cpp`
registers them with torch's dispatcher as the "cpu" kernels of `actsparse::input_sparse_linear`,
`input_sparse_gated`, `output_sparse_rows`, `dense_linear`, `decode_attention` and `topk_kept`, so
a CPU decode step traces and compiles like a CUDA one and each op call goes from the compiled graph
straight into C++. Both are compiled together with
``-O3 -march=native`` against this torch's headers at first use (`library()`, ~15 s once), and
registered on load; `unregister()` / `register()` let another CPU kernel stand in (tests).
Activations and outputs are of the model's dtype, weights float32, bfloat16 or float16 (fp32
accumulation; the vector path, AVX-512, AVX2 or scalar, is picked at run time: `isa()` says
which, `set_isa` forces a lower one for tests); `set_threads` picks the kernels' thread count
(default 1).

The library is cached under ``$ACTSPARSE_CACHE`` (default ``$XDG_CACHE_HOME/actsparse`` or
``~/.cache/actsparse``) by a hash of the sources, the flags, the compiler's resolved path and
version, torch's version and the CPU. The cache is private: its folders are created 0700, and a
library (or a folder) not owned by the user, or writable by group or others, is never loaded: the
library is rebuilt, the folder refused. ``$CXX`` picks the compiler (default g++).
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

from ..cache import cache_root, is_private
from ..errors import ActSparseError
HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_kernels.cpp", HERE / "cpu_torch_ops.cpp")
HEADER = HERE / "cpu_kernels.h"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++20")  # torch's headers want C++20
_LIB: ctypes.CDLL | None = None

_C = ctypes.c_int
_SIGNATURES = {  # the settings called from Python: name: (argument types, result type)
    "actsparse_cpu_isa": ((), _C),
    "actsparse_cpu_set_isa": ((_C,), _C),
    "actsparse_cpu_set_threads": ((_C,), _C),
    "actsparse_register_cpu_ops": ((_C,), _C),
}
ISA_NAMES = ("scalar", "avx2", "avx512")


def cache_dir() -> Path:
    return cache_root() / "cpu-kernels"


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
    for part in (*(f.read_bytes() for f in (*SOURCES, HEADER)), " ".join(_torch_flags()).encode(), resolved.encode(),
                 version.encode(), torch.__version__.encode(), platform.machine().encode(), _cpu_signature().encode()):
        digest.update(part)
    return cache_dir() / digest.hexdigest()[:16] / "libactsparse_cpu.so"


def private_dir(path: Path) -> None:
    """Create `path` and the cache folders above it 0700; refuse one someone else owns or can
    write to."""
    for folder in (cache_dir().parent, cache_dir(), path):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not is_private(folder):
            raise ActSparseError(
                f"the cpu kernel cache {folder} is not private (it must be owned by you and not writable by "
                f"group or others): fix its permissions, or set ACTSPARSE_CACHE to a folder of your own"
            )


def trusted_library(path: Path) -> bool:
    """Whether `path` is a library this user built: a planted or loosened one is removed."""
    if not path.exists():
        return False
    if is_private(path):
        return True
    path.unlink()
    return False


def _torch_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return [*FLAGS, *(f"-I{p}" for p in include_paths()), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def _torch_link() -> list[str]:
    from torch.utils.cpp_extension import library_paths

    folders = library_paths()
    return [*(f"-L{p}" for p in folders), *(f"-Wl,-rpath,{p}" for p in folders), "-lc10", "-ltorch_cpu"]


def build(compiler: str, target: Path) -> None:
    private_dir(target.parent)
    print(f"actsparse: building the CPU kernels with {compiler} (once, cached in {target.parent})", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_torch_flags(), *map(str, SOURCES), "-o", tmp, *_torch_link()],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ActSparseError(f"building the CPU kernels with {compiler} failed:\n{result.stderr.strip()}")
        os.chmod(tmp, 0o700)  # the linker's mode follows the umask
        os.replace(tmp, target)  # atomic: a concurrent build leaves one whole library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library() -> ctypes.CDLL:
    """The kernel library, built at first use, loaded, its ops registered (once)."""
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
        register()
    return _LIB


def set_threads(threads: int) -> None:
    """Threads each kernel call uses (the caller's and threads-1 pooled ones)."""
    if threads < 1:
        raise ActSparseError(f"the cpu kernels need threads >= 1, got {threads}")
    library().actsparse_cpu_set_threads(threads)


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


def register() -> None:
    """Make the C++ kernels the "cpu" kernels of the `actsparse::` ops they implement (again)."""
    if library().actsparse_register_cpu_ops(1) != 0:
        raise ActSparseError("registering the cpu kernels with torch's dispatcher failed")


def unregister() -> None:
    """Drop their registration: the ops' other "cpu" kernel (or reference) runs instead."""
    library().actsparse_register_cpu_ops(0)
