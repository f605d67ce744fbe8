"""Keep large freed blocks in the process's heap while a CPU phase allocates the same big
temporaries over and over (a tune's logits, their log-softmaxes and gradients: ~100 MB each).

glibc serves blocks above its mmap threshold (at most 32 MiB, by its dynamic rule) with fresh
`mmap`s and unmaps them on free, so every step faults all their pages in again: on this project's
CPU machine rsparse-kl's sparsify spent 157 s of its 740 s in the kernel, 23 s of 658 s with the
blocks kept (BENCHMARKS.md). Raising the threshold and the trim threshold with `mallopt`
(mallopt(3)) lets freed blocks be reused instead.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform

# mallopt(3) parameters and glibc's documented defaults, restored on exit (glibc's dynamic
# adjustment of the thresholds, which any mallopt call turns off, is not restored).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 128 * 1024
RETAINED_THRESHOLD = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@contextlib.contextmanager
def retain_freed_blocks(enabled: bool = True):
    """Within the block, glibc keeps blocks of up to 1 GiB in the heap when they are freed; on exit
    the thresholds go back to glibc's defaults and the free heap memory back to the system
    (`malloc_trim`). Outside glibc (or with `enabled` False) a no-op."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, RETAINED_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, RETAINED_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
