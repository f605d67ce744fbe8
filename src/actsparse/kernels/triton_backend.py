"""The "triton" backend: the Triton kernels of `triton_ops.py` behind `dispatch.make_backend`.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). One-token decode
steps always run the kernels. A batch of up to `MAX_BATCH` tokens reads the union of its tokens'
masks, most of the rows at moderate sparsity (at 50%, 74% of them at batch 2 and 94% at batch 4),
so each module times its kernel against the dense products on its first eager call at that batch
size and keeps the faster (`dispatch.make_backend`'s `batch_timer`); on the H200 the kernels win
at 90% and mostly lose at 50% (BENCHMARKS.md, runs 23-27). Larger inputs run the torch reference.
`batched_backend` builds a backend that runs the kernels on every batch, for tests and
measurements.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import ActSparseError
from . import register_backend, tuning
from .dispatch import make_backend
from .triton_ops import MAX_BATCH, input_sparse_gated, input_sparse_linear, output_sparse_rows, set_sparsity_hint, topk_kept

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_model(model: torch.nn.Module) -> None:
    param = next(model.parameters())
    if param.device.type != "cuda" and not tuning.interpreting():
        raise ActSparseError(
            f"the triton backend runs on CUDA devices; the model is on {param.device} "
            "(use the 'cpu' backend there, or TRITON_INTERPRET=1 to test the kernels on the CPU)"
        )
    if param.dtype not in DTYPES:
        raise ActSparseError(f"the triton backend takes float32, float16 or bfloat16 weights, not {param.dtype}")


def kernel_and_dense_seconds(kernel: Callable[[], object], dense: Callable[[], object]) -> tuple[float, float]:
    """Seconds per call of a batch's kernel call and of the dense products it replaces, each timed
    alone (`tuning.seconds`); under the interpreter, where times mean nothing, the kernel wins."""
    if tuning.interpreting():
        return 0.0, math.inf
    device = torch.device("cuda", torch.cuda.current_device())
    return tuning.seconds(kernel, device), tuning.seconds(dense, device)


def batched_backend(name: str, batch_timer: Callable[[Callable[[], object], Callable[[], object]], tuple[float, float]] | None = None):
    """The kernels as a backend; without a `batch_timer` (see `dispatch.make_backend`) they run
    every batch of up to `MAX_BATCH` tokens."""
    return make_backend(name, input_sparse_linear, output_sparse_rows, MAX_BATCH, _check_model, set_sparsity_hint,
                        input_sparse_gated, batch_timer, topk_kept)


register_backend(batched_backend("triton", kernel_and_dense_seconds))
