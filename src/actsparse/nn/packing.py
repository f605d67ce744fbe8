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


def fold_lowrank(weight: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """``W - B A`` (fp32, cast once to W's dtype): the weight read over the kept channels when the
    low-rank path takes ``z = A x`` on the whole input; W itself without a low-rank path."""
    if a is None:
        return weight.detach()
    return (weight.detach().float() - b.detach().float() @ a.detach().float()).to(weight.dtype)


def lowrank_sources(weight: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """What a folded pack is made from (`pack`'s sources)."""
    return (weight,) if a is None else (weight, a, b)


def pack_lowrank(module: nn.Module, members: list, gate_up_group: int | None = None) -> None:
    """`module.packed_lowrank_a` / `packed_lowrank_b`: the low-rank factors of linears run as one
    call (``members``, SparseLinears reading one input; none: both dropped), A stacked (one z
    product) and B block-diagonal over the call's output columns (interleaved as
    `interleave_gate_up` orders them, for a gate+up pair with `gate_up_group`)."""
    ranked = [m for m in members if m.rank]
    if not ranked:
        pack(module, "packed_lowrank_a", None)
        pack(module, "packed_lowrank_b", None)
        return
    like, ranks = members[0].weight, sum(m.rank for m in ranked)
    sources = tuple(t for m in ranked for t in (m.lowrank_a, m.lowrank_b))
    pack(module, "packed_lowrank_a", lambda: torch.cat([m.lowrank_a for m in ranked]), like,
         (ranks, like.shape[1]), sources=sources)

    def block_diagonal() -> torch.Tensor:
        b = torch.block_diag(*[m.lowrank_b if m.rank else m.weight.new_zeros(m.out_features, 0) for m in members])
        if gate_up_group is None:
            return b
        gate, up = b.split([m.out_features for m in members])
        return interleave_gate_up(gate.T, up.T, gate_up_group).T

    pack(module, "packed_lowrank_b", block_diagonal, like, (sum(m.out_features for m in members), ranks), sources=sources)


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
