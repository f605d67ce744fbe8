"""`DenseLinear`: an `nn.Linear` whose decode batches can run `actsparse::dense_linear`.

For the linears no method sparsifies but a decode step still reads in full, above all the LM head
(SmolLM2's tied 49152x576 embedding is a fifth of the model's bytes). It is an `nn.Linear`, with
the same parameters and state-dict keys, so saving, loading and weight tying see no difference.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import ops
from .linear import dense_forward


class DenseLinear(nn.Linear):
    """`nn.Linear`; with `set_kernels(True)` batches of up to `ops.MAX_BATCH` tokens run the op."""

    kernels = False

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DenseLinear":
        """The same module over the same parameters (a tied weight stays tied)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def set_kernels(self, enabled: bool) -> None:
        self.kernels = bool(enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels and x.numel() // self.in_features <= ops.MAX_BATCH:
            return dense_forward(x, self.weight, self.bias)
        return super().forward(x)
