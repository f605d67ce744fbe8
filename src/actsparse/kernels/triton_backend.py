"""The "triton" backend: the Triton kernels of `triton_ops.py` behind `dispatch.make_backend`.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import torch

from ..errors import ActSparseError
from . import register_backend
from .dispatch import make_backend
from .triton_ops import MAX_BATCH, input_sparse_linear, output_sparse_rows, set_sparsity_hint
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


register_backend(
    make_backend(
        "triton",
        input_sparse_linear,
        output_sparse_rows,
        MAX_BATCH,
        _check_model,
        set_sparsity_hint,
    )
)
