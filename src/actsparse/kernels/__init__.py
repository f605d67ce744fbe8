"""The `actsparse::` ops (`ops.py`) and their kernels: Triton for CUDA tensors (`triton_ops.py`),
C++ for CPU tensors (`cpu_ops.py`). `load_kernels(device)` registers a device's kernels (the
modules that define them register on import; the CPU library is built then, once, not inside a
first forward); until then, and on devices without kernels, the ops run their torch reference.
"""
from __future__ import annotations

import importlib

import torch

from ..errors import ActSparseError

# The modules registering each device type's kernels (Triton is an optional dependency).
KERNEL_MODULES = {
    "cuda": ("actsparse.kernels.triton_ops", "actsparse.kernels.attention_ops"),
    "cpu": ("actsparse.kernels.cpu_ops",),
}


def load_kernels(device: torch.device | str) -> None:
    """Register the kernels of `device`'s type for the `actsparse::` ops (once)."""
    device_type = torch.device(device).type
    if device_type not in KERNEL_MODULES:
        raise ActSparseError(f"actsparse has kernels for {', '.join(KERNEL_MODULES)} devices, not {device_type!r}")
    try:
        for module in KERNEL_MODULES[device_type]:
            importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ActSparseError(f"the {device_type} kernels need the {e.name!r} package (pip install 'actsparse[gpu]')") from None
    if device_type == "cpu":
        from .cpu_ops import library

        library()
