"""Where a model's sparse modules run: the `actsparse::` ops (the kernels of the model's device)
or the torch reference. Every command goes through `use_kernels` and `resolve_backend`.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ActSparseError
from .kernels import load_kernels
from .models import layer_specs
from .nn import DenseLinear, SparseGatedMLP, SparseLinear

BACKENDS = ("auto", "kernels", "torch")
KERNEL_DTYPES = {"cuda": (torch.float32, torch.float16, torch.bfloat16), "cpu": (torch.float32, torch.bfloat16, torch.float16)}
# Devices whose dense decode linears (and LM head) run `actsparse::dense_linear`: on the CPU torch's
# batch-1 matvec reads fp32 weights at about half a core's bandwidth and bf16 ones at less; on CUDA
# cuBLAS is at bandwidth already, and an opaque op would only block Inductor's fusions.
DENSE_KERNEL_DEVICES = ("cpu",)


def kernels_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether actsparse has kernels for weights of `dtype` on `device`."""
    return dtype in KERNEL_DTYPES.get(torch.device(device).type, ())


def _supported() -> str:
    return "kernels take " + "; ".join(f"{', '.join(str(t).removeprefix('torch.') for t in dtypes)} on {device}"
                                       for device, dtypes in KERNEL_DTYPES.items())


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a model on `device` in `dtype` runs its kernels under `--backend` `backend`:
    "auto" where there are kernels for them, "kernels" always (an error where there are none),
    "torch" never."""
    if backend not in BACKENDS:
        raise ActSparseError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ActSparseError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if backend == "kernels" and not kernels_run(device, dtype):
        raise ActSparseError(f"no actsparse kernels for {dtype} weights on {device.type} ({_supported()}); "
                             "use --backend torch or another --dtype")
    return backend == "kernels" or (backend == "auto" and kernels_run(device, dtype))


def use_kernels(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run every actsparse module of `model` through the kernels of its device (True) or the
    torch reference (False); returns `model`. On `DENSE_KERNEL_DEVICES` the dense linears and
    the LM head (swapped for a `DenseLinear` over the same weight) run the kernels too. The modules keep their packed weights in step with
    later sparsity changes themselves; call it again after moving the model to another device."""
    if enabled:
        param = next(model.parameters())
        if not kernels_run(param.device, param.dtype):
            raise ActSparseError(f"no actsparse kernels for {param.dtype} weights on {param.device.type} "
                                 f"({_supported()}); run the torch reference (enabled=False) or convert the model")
        load_kernels(param.device)
    dense = next(model.parameters()).device.type in DENSE_KERNEL_DEVICES
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if enabled and dense and type(head) is nn.Linear:
        head = DenseLinear.from_linear(head)
        model.set_output_embeddings(head)
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.set_kernels(enabled, dense=dense)
        elif isinstance(module, (SparseGatedMLP, DenseLinear)):
            module.set_kernels(enabled)
    if enabled:
        for spec in layer_specs(model):
            names = spec.linear_names()
            if all(role in names for role in ("q", "k", "v")):
                members = [model.get_submodule(names[role]) for role in ("q", "k", "v")]
                if all(isinstance(m, SparseLinear) for m in members):
                    SparseLinear.share_input(members)
    return model
