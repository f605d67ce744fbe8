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
        device = next(model.parameters()).device
        # Each hook gets its own layer's term list and (zeros, entries) counts rather than an index
        # into shared ones: under torch.compile an index or a shared list's length is guarded on,
        # and every layer would be compiled again.
        self._terms: list[list[torch.Tensor]] = [[] for _ in specs]
        self._counts = [torch.zeros(2, dtype=torch.float64, device=device) for _ in specs]
        self._handles = [
            spec.mlp.down_linear.register_forward_pre_hook(self._hook(terms, counts))
            for spec, terms, counts in zip(specs, self._terms, self._counts)
        ]

    @staticmethod
    def _hook(terms: list[torch.Tensor], counts: torch.Tensor):
        def hook(module: nn.Module, args: tuple) -> None:
            if not module.training:
                return
            m = args[0]
            terms.append(m.abs().mean(dtype=torch.promote_types(m.dtype, torch.float32)))
            counts[0] += (m == 0).sum()
            counts[1] += m.numel()

        return hook

    def pop_term(self) -> torch.Tensor:
        """The penalty of the forward passes since the last call: per-layer terms summed (or
        averaged) over layers; several passes (e.g. a recomputation) add up."""
        terms = [term for layer in self._terms for term in layer]
        if not terms:
            raise RuntimeError("no MLP intermediate was seen: run a forward pass in training mode first")
        total = torch.stack(terms).sum()
        if self.reduce == "mean":
            total = total / self.layers
        for layer in self._terms:
            layer.clear()
        return total

    def pop_sparsity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(zeros, entries) per layer since the last call."""
        counts = torch.stack(self._counts)
        for layer in self._counts:
            layer.zero_()
        return counts[:, 0], counts[:, 1]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "IntermediateL1":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
