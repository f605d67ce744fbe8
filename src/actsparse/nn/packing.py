"""Input-major weight copies for the ops, packed by the modules that own them (never saved).

A pack is re-made only when its shape, dtype or device no longer match or a tensor it was made
from has changed since (another storage, or written in place: a method folding rotations or
refitting weights); otherwise it is kept in place, which keeps captured CUDA graphs valid.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _fingerprint(sources: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in sources)


def pack(module: nn.Module, name: str, make: Callable[[], torch.Tensor] | None, like: torch.Tensor | None = None,
         shape: tuple | None = None, sources: tuple[torch.Tensor, ...] | None = None) -> None:
    """Buffer `name` of `module` becomes `make()` (non-persistent), unless an equal one made from
    the same, unchanged `sources` (default: `like`) is there; `make=None` drops it."""
    made_from = module.__dict__.setdefault("_pack_sources", {})
    if make is None:
        setattr(module, name, None)
        made_from.pop(name, None)
        return
    fingerprint = _fingerprint(sources if sources is not None else (like,))
    existing = getattr(module, name, None)
    if (existing is None or existing.shape != shape or existing.dtype != like.dtype or existing.device != like.device
            or made_from.get(name) != fingerprint):
        setattr(module, name, make().contiguous())
        made_from[name] = fingerprint


def pack_transposed(module: nn.Module, name: str, weight: torch.Tensor | None) -> None:
    if weight is None:
        pack(module, name, None)
    else:
        pack(module, name, lambda: weight.detach().T, weight, tuple(weight.shape[::-1]))


def pack_zero(module: nn.Module, device: torch.device) -> None:
    """A zero threshold (top-K inputs arrive with their dropped entries zeroed)."""
    zero = torch.zeros((), device=device)
    pack(module, "packed_zero", lambda: zero, zero, (), sources=())


def gate_up_group(intermediate: int) -> int:
    """Columns per group of the interleaved gate+up weight: gated launches need column blocks,
    and spread split-K slices, of whole group pairs, so groups are small: 32 or 16 columns where
    they divide the width (else one group)."""
    return next((g for g in (32, 16) if intermediate % g == 0), intermediate)


def interleave_gate_up(gate_t: torch.Tensor, up_t: torch.Tensor, group: int) -> torch.Tensor:
    """``[K, 2J]`` columns g[0:G], u[0:G], g[G:2G], u[G:2G], ... (gate_t, up_t: ``[K, J]``)."""
    k, j = gate_t.shape
    return torch.stack([gate_t.reshape(k, j // group, group), up_t.reshape(k, j // group, group)], dim=2).reshape(k, 2 * j)


def split_gate_up(gu: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves of an output over interleaved columns."""
    j = gu.shape[-1] // 2
    pairs = gu.reshape(*gu.shape[:-1], j // group, 2, group)
    return pairs[..., 0, :].reshape(*gu.shape[:-1], j), pairs[..., 1, :].reshape(*gu.shape[:-1], j)


_ACTIVATION_NAMES = {
    "SiLU": "silu", "SiLUActivation": "silu", "ReLU": "relu", "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
}


def activation_name(act: Callable) -> str | None:
    """The ops' name for an MLP activation module (`ops.ACTIVATIONS`), or None for another."""
    if isinstance(act, torch.nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return _ACTIVATION_NAMES.get(type(act).__name__)
