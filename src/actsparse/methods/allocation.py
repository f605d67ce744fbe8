"""Per-linear sparsity allocation: uniform, or TEAL's greedy per-block search.

Greedy: for each decoder block, starting dense, repeatedly raise by `step / w_p` the sparsity of
the one linear p whose increase least raises the block's output error
``||y - y_dense||^2 / ||y_dense||^2`` on calibration tokens, until the block's parameter-weighted
sparsity reaches the target. As in TEAL's code, w_p is p's size relative to the attention output
projection (TEAL's q = 1 for Llama), so every move adds the same weight reads to the block: a
square d x d linear steps by `step`, an MLP linear by less, a GQA k/v by more.

The search is lazy: candidates are tried in the order of their last measured error, and the first
whose fresh error is still no larger than every other candidate's last error is taken. Errors only
grow as the block gets sparser, so a stale error is a lower bound and the choice is the one the
full scan would make whenever that holds; it costs about two block forwards per move instead of one
per linear. A try recomputes only what the tried linear changes: trying an MLP linear replays the
attention's output, and the outputs of the MLP linears that read its input or feed it (gate and up
for down; up for gate, gate for up), as they were last computed (`_KnownOutputs`). Most moves are
MLP moves, whose steps are small because MLP linears are large.
"""
from __future__ import annotations

import contextlib
import math
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
            linear_names = spec.linear_names()
            names = [n for n in linear_names.values() if targets.get(n) and n not in allocation]
            if names:
                allocation.update(_greedy_block(model, spec, names, targets, inputs[spec.index], install, step,
                                                model.get_submodule(linear_names["o"]).weight.numel()))
    return allocation


def greedy_from_config(model: nn.Module, specs: list[LayerSpec], config, calibration: torch.Tensor,
                       targets: dict[str, float], install: Install) -> dict[str, float]:
    """`greedy_allocation` with a config's greedy_step and greedy_tokens (the first calibration
    windows that hold that many tokens); linears whose target differs from config.sparsity (the
    overrides) keep it and are not searched."""
    windows = calibration[: max(1, math.ceil(config.greedy_tokens / calibration.shape[1]))]
    fixed = {n: s for n, s in targets.items() if s != config.sparsity}
    return greedy_allocation(model, specs, targets, windows, install, config.greedy_step,
                             f"{config.method}: greedy allocation", fixed)


class _Replay(nn.Module):
    """Stands in for a module whose output for the block's calibration inputs is already known."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class _KnownOutputs:
    """Outputs of some of a block's modules on its calibration inputs, in their current state.

    `replaying(names)` runs one block forward with each named module that has a known output
    replaced by a `_Replay` of it; the others run and their outputs are recorded. A module's
    output stays known until `forget` (its state or its input changed)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.outputs: dict[str, object] = {}

    def forget(self, name: str) -> None:
        self.outputs.pop(name, None)

    @contextlib.contextmanager
    def replaying(self, names: list[str]):
        swapped, handles = [], []
        try:
            for name in names:
                module = self.model.get_submodule(name)
                if name in self.outputs:
                    parent, _, attr = name.rpartition(".")
                    setattr(self.model.get_submodule(parent), attr, _Replay(self.outputs[name]))
                    swapped.append((parent, attr, module))
                else:
                    handles.append(module.register_forward_hook(
                        lambda module, args, output, name=name: self.outputs.__setitem__(name, output)))
            yield
        finally:
            for h in handles:
                h.remove()
            for parent, attr, module in swapped:
                setattr(self.model.get_submodule(parent), attr, module)


def _unchanged_by(spec: LayerSpec, name: str) -> list[str]:
    """The modules of `spec`'s block whose outputs a change of linear `name` leaves as they were
    and that a block forward runs: for an MLP linear, the attention and the MLP linears that read
    its input (gate / up) or feed it (down); for an attention linear, none."""
    roles = {n: r for r, n in spec.linear_names().items()}
    if name.startswith(spec.attn_prefix + "."):
        return []
    feeding = {"gate": ("up",), "up": ("gate",), "gate_up": (), "down": ("gate", "up", "gate_up")}[roles[name]]
    return [spec.attn_prefix] + [n for n, r in roles.items() if r in feeding]


def _greedy_block(model, spec, names, targets, inputs, install, step, reference_size) -> dict[str, float]:
    args, kwargs = inputs
    known = _KnownOutputs(model)
    unchanged = {n: _unchanged_by(spec, n) for n in names}
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    total = sum(sizes.values())
    share = {n: sizes[n] / total for n in names}
    target = sum(targets[n] * share[n] for n in names)
    dense = _layer_output(spec.layer, args, kwargs).float()
    dense_norm = dense.pow(2).sum()
    current = {n: 0.0 for n in names}
    last_error = {n: 0.0 for n in names}
    reached = 0.0

    def increment(n: str) -> float:
        return min(step * reference_size / sizes[n], (target - reached) / share[n], MAX_LINEAR_SPARSITY - current[n])

    def error_after(n: str, inc: float) -> float:
        install(n, current[n] + inc)
        with known.replaying(unchanged[n]):
            error = float((_layer_output(spec.layer, args, kwargs).float() - dense).pow(2).sum() / dense_norm)
        install(n, current[n])
        return error

    while reached < target - 1e-9:
        open_names = sorted((n for n in names if increment(n) > 1e-9), key=lambda n: (last_error[n], names.index(n)))
        if not open_names:
            break
        for i, n in enumerate(open_names):
            last_error[n] = error_after(n, increment(n))
            if all(last_error[n] <= last_error[m] for m in open_names[i + 1:]):
                break
        n = min(open_names[: i + 1], key=lambda m: last_error[m])
        inc = increment(n)
        current[n] += inc
        reached += share[n] * inc
        install(n, current[n])
        if unchanged[n]:
            known.forget(n)
        else:  # an attention linear: the attention's output, and so every MLP input, changed
            known.outputs.clear()
    return current
