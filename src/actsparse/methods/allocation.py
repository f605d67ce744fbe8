"""Per-linear sparsity allocation: uniform, or TEAL's greedy per-block search.

Greedy: for each decoder block, starting dense, repeatedly raise by `step / w_p` the sparsity of
the one linear p (w_p = p's share of the block's parameters, so every move adds `step` to the
block's parameter-weighted sparsity) whose increase least raises the block's output error
``||y - y_dense||^2 / ||y_dense||^2`` on calibration tokens, until the block reaches the target.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import LayerSpec

MAX_LINEAR_SPARSITY = 0.95

# install(name, sparsity) puts one linear in the state for that sparsity (dense at 0).
Install = Callable[[str, float], None]


def capture_layer_inputs(model: nn.Module, specs: list[LayerSpec], tokens: torch.Tensor) -> list[tuple]:
    """(args, kwargs) of every decoder layer's call on `tokens`, for re-running blocks alone."""
    captured: list[tuple | None] = [None] * len(specs)
    handles = []

    def hook(index):
        def fn(module, args, kwargs):
            detached = tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args)
            captured[index] = (detached, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")})

        return fn

    try:
        for spec in specs:
            handles.append(spec.layer.register_forward_pre_hook(hook(spec.index), with_kwargs=True))
        with torch.no_grad():
            model(input_ids=tokens.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def _layer_output(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(*args, **{**kwargs, "use_cache": False})
    return out[0] if isinstance(out, tuple) else out


def greedy_allocation(
    model: nn.Module,
    specs: list[LayerSpec],
    targets: dict[str, float],
    tokens: torch.Tensor,
    install: Install,
    step: float,
    desc: str,
    fixed: dict[str, float] | None = None,
) -> dict[str, float]:
    """Per-linear sparsities whose parameter-weighted mean over the searched linears of each block
    equals their mean target; linears in `fixed` keep their sparsity and are not searched."""
    inputs = capture_layer_inputs(model, specs, tokens)
    allocation: dict[str, float] = dict(fixed or {})
    for name, sparsity in allocation.items():
        install(name, sparsity)
    with torch.no_grad():
        for spec in tqdm(specs, desc=desc, unit="layer", leave=False):
            names = [n for n in spec.linear_names().values() if targets.get(n) and n not in allocation]
            if not names:
                continue
            args, kwargs = inputs[spec.index]
            sizes = {n: model.get_submodule(n).weight.numel() for n in names}
            total = sum(sizes.values())
            share = {n: sizes[n] / total for n in names}
            target = sum(targets[n] * share[n] for n in names)
            reference = _layer_output(spec.layer, args, kwargs)
            ref_norm = reference.float().pow(2).sum()
            current = {n: 0.0 for n in names}
            reached = 0.0
            while reached < target - 1e-9:
                best = None
                for n in names:
                    inc = min(step / share[n], (target - reached) / share[n], MAX_LINEAR_SPARSITY - current[n])
                    if inc <= 1e-9:
                        continue
                    install(n, current[n] + inc)
                    err = float((_layer_output(spec.layer, args, kwargs).float() - reference.float()).pow(2).sum() / ref_norm)
                    install(n, current[n])
                    if best is None or err < best[0]:
                        best = (err, n, inc)
                if best is None:
                    break
                _, n, inc = best
                current[n] += inc
                reached += share[n] * inc
                install(n, current[n])
            allocation.update(current)
    return allocation
