"""Whether a decode batch of 2 to `ops.MAX_BATCH` tokens runs a module's kernels.

A batch reads every weight row some token keeps (the union of their masks), at moderate sparsity
most rows (at 50%, 74% of them at batch 2 and 94% at batch 4), so on CUDA each module times its
kernel call against the dense products it replaces on its first eager call at that batch size
and keeps the faster (`DecodeEngine` makes one before compiling; a batch size first met inside
torch.compile runs the reference). One token always runs the kernels; so do CPU tensors and the
Triton interpreter, where times say nothing about a GPU.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch

from . import tuning


_ALWAYS = {"on": False}


@contextlib.contextmanager
def always_kernels() -> Iterator[None]:
    """Inside the block every batch runs the kernels, unmeasured (for measuring them on batches)."""
    before = _ALWAYS["on"]
    _ALWAYS["on"] = True
    try:
        yield
    finally:
        _ALWAYS["on"] = before


def kernel_and_dense_seconds(kernel: Callable[[], object], dense: Callable[[], object],
                             device: torch.device) -> tuple[float, float]:
    """Seconds per call of the kernel call and of the dense products, each timed alone
    (`tuning.seconds`); (0, inf) untimed where the kernel always runs."""
    if tuning.interpreting() or device.type != "cuda":
        return 0.0, math.inf
    return tuning.seconds(kernel, device), tuning.seconds(dense, device)


def kernel_pays(measured: dict[int, tuple[float, float]], tokens: int, kernel: Callable[[], object],
                dense: Callable[[], object], device: torch.device) -> bool:
    """Whether to run the kernel on `tokens` tokens; `measured` is the module's record of
    (kernel seconds, dense seconds) by batch size, filled here on first use."""
    if tokens == 1 or _ALWAYS["on"]:
        return True
    if tokens not in measured:
        if torch.compiler.is_compiling():
            return False
        measured[tokens] = kernel_and_dense_seconds(kernel, dense, device)
    kernel_s, dense_s = measured[tokens]
    return kernel_s < dense_s
