"""Replace a decoder's linears and gated MLPs by actsparse modules, in place.

After `swap_modules` every decoder linear is a `SparseLinear` (dense mode) and every MLP a
`SparseGatedMLP` (no gate mask): the model computes bitwise what it computed before, and every
method then only sets sparsity state on these modules.
"""
from __future__ import annotations

from torch import nn

from .models import LayerSpec, layer_specs, set_submodule
from .nn import SparseGatedMLP, SparseLinear


def swap_modules(model: nn.Module) -> list[LayerSpec]:
    """Swap once (idempotent) and return the layer specs, which then point at the new modules."""
    for spec in layer_specs(model):
        for attr in list(spec.attn_inputs.values()) + [spec.attn_output]:
            _swap_linear(spec.attn, attr)
        if not isinstance(spec.mlp, SparseGatedMLP):
            mlp = spec.mlp
            parts = {}
            for attr in (spec.gate, spec.up, spec.gate_up, spec.down):
                if attr is not None:
                    parts[attr] = _as_sparse(getattr(mlp, attr))
            new = SparseGatedMLP(
                gate=parts.get(spec.gate),
                up=parts.get(spec.up),
                gate_up=parts.get(spec.gate_up),
                down=parts[spec.down],
                act=spec.act,
                names=(spec.gate, spec.up, spec.gate_up, spec.down),
            )
            new.gate_threshold = new.gate_threshold.to(parts[spec.down].weight.device)
            set_submodule(model, spec.mlp_prefix, new)
    return layer_specs(model)


def _as_sparse(linear: nn.Module) -> SparseLinear:
    return linear if isinstance(linear, SparseLinear) else SparseLinear.from_linear(linear)


def _swap_linear(owner: nn.Module, attr: str) -> None:
    setattr(owner, attr, _as_sparse(getattr(owner, attr)))


def sparse_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every actsparse module by full name (after `swap_modules`)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseGatedMLP))}
