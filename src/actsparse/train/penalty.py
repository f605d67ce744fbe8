"""The L1 penalty on the MLP intermediate ``m = act(g) * u``, read where `down_proj` consumes it.

Forward pre-hooks on every layer's down projection collect, while the model is in training mode,
each layer's mean |m| (over tokens and intermediate channels, with its graph, for the loss) and
its count of exact zeros (the measured sparsity, detached). The hooks are removed by `remove`
or on leaving the `with` block.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import layer_specs


class IntermediateL1:
    def __init__(self, model: nn.Module, reduce: str = "sum") -> None:
        specs = layer_specs(model)
        self.reduce = reduce
        self.layers = len(specs)
        self._terms: list[torch.Tensor] = []
        device = next(model.parameters()).device
        self.zeros = torch.zeros(len(specs), dtype=torch.float64, device=device)
        self.entries = torch.zeros(len(specs), dtype=torch.float64, device=device)
        self._handles = [
            spec.mlp.down_linear.register_forward_pre_hook(self._hook(spec.index)) for spec in specs
        ]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if not module.training:
                return
            m = args[0]
            self._terms.append(m.abs().mean(dtype=torch.promote_types(m.dtype, torch.float32)))
            self.zeros[index] += (m == 0).sum()
            self.entries[index] += m.numel()

        return hook

    def pop_term(self) -> torch.Tensor:
        """The penalty of the forward passes since the last call: per-layer terms summed (or
        averaged) over layers; several passes (e.g. a recomputation) add up."""
        if not self._terms:
            raise RuntimeError("no MLP intermediate was seen: run a forward pass in training mode first")
        total = torch.stack(self._terms).sum()
        if self.reduce == "mean":
            total = total / self.layers
        self._terms = []
        return total

    def pop_sparsity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(zeros, entries) per layer since the last call."""
        counts = (self.zeros.clone(), self.entries.clone())
        self.zeros.zero_()
        self.entries.zero_()
        return counts

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "IntermediateL1":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
