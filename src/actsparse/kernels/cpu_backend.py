"""The "cpu" backend: the C++ kernels of `cpu_ops.py` behind `dispatch.make_backend` (float32)."""
from __future__ import annotations

import torch

from ..errors import ActSparseError
from . import register_backend
from .cpu_ops import MAX_BATCH, input_sparse_linear, library, output_sparse_rows
from .dispatch import make_backend


def _check_model(model: torch.nn.Module) -> None:
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ActSparseError(
            f"the cpu backend runs float32 models on the CPU; this one is {param.dtype} on {param.device} "
            "(load it with dtype=torch.float32, or use the 'triton' backend on a GPU)"
        )
    library()  # build (once) before the first forward, not inside it


register_backend(make_backend("cpu", input_sparse_linear, output_sparse_rows, MAX_BATCH, _check_model))
