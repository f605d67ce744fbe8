"""`retain_freed_blocks`: large blocks come from the heap inside it, from mmap outside (glibc)."""
import ctypes
import platform

import pytest
import torch

from actsparse.heap import retain_freed_blocks

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mmapped_bytes() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


def mmapped_growth_of_allocating(nbytes: int) -> int:
    before = mmapped_bytes()
    block = torch.empty(nbytes, dtype=torch.uint8)
    grown = mmapped_bytes() - before
    del block
    return grown


@glibc_only
def test_large_blocks_leave_mmap_inside_and_return_after():
    size = 64 << 20
    assert mmapped_growth_of_allocating(size) >= size
    with retain_freed_blocks():
        assert mmapped_growth_of_allocating(size) == 0
    assert mmapped_growth_of_allocating(size) >= size


@glibc_only
def test_disabled_changes_nothing():
    size = 64 << 20
    with retain_freed_blocks(enabled=False):
        assert mmapped_growth_of_allocating(size) >= size


@glibc_only
def test_thresholds_restored_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with retain_freed_blocks():
            raise RuntimeError("boom")
    assert mmapped_growth_of_allocating(64 << 20) >= 64 << 20
