"""The "triton" backend: the Triton kernels of `triton_ops.py` behind `dispatch.make_backend`.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). The kernels take up
to `MAX_BATCH` tokens, but the backend sends them decode steps of one token only: on the H200
(benchmarks/results/gpu_matrix_run2.json) the batched kernel ran at 0.6x cuBLAS whatever the
sparsity, and at batch 4 the union of the tokens' masks keeps 94% of the rows at 50% sparsity
anyway. Larger inputs run the torch reference (cuBLAS on the masked input). `batched_backend`
builds a backend that sends the kernels up to 8 tokens, for tests and measurements.
"""
from __future__ import annotations

import torch

from ..errors import ActSparseError
from . import register_backend
from .dispatch import make_backend
from .triton_ops import MAX_BATCH, input_sparse_gated, input_sparse_linear, output_sparse_rows, set_sparsity_hint
from .tuning import interpreting

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_model(model: torch.nn.Module) -> None:
    param = next(model.parameters())
    if param.device.type != "cuda" and not interpreting():
        raise ActSparseError(
            f"the triton backend runs on CUDA devices; the model is on {param.device} "
            "(use the 'cpu' backend there, or TRITON_INTERPRET=1 to test the kernels on the CPU)"
        )
    if param.dtype not in DTYPES:
        raise ActSparseError(f"the triton backend takes float32, float16 or bfloat16 weights, not {param.dtype}")


KERNEL_MAX_TOKENS = 1


def batched_backend(name: str, max_tokens: int = MAX_BATCH):
    return make_backend(name, input_sparse_linear, output_sparse_rows, max_tokens, _check_model, set_sparsity_hint, input_sparse_gated)


register_backend(batched_backend("triton", KERNEL_MAX_TOKENS))
