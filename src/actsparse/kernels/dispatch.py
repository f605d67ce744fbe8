"""How a kernel backend runs `SparseLinear` and `SparseGatedMLP`, whatever the kernels are.

A backend here is a pair of ops with the semantics of `triton_ops.py`'s custom ops:
  input_sparse_linear(x, weight_t, threshold, scale, bias, lowrank_b, lowrank_z, complement)
  output_sparse_rows(x, a, threshold, weight)
`make_backend` turns them into an `actsparse.kernels.Backend` that computes exactly what the
torch reference in `actsparse.nn` computes:
  - threshold selection: the op compares the score with the module's threshold itself;
  - top-K selection: the mask comes from torch (`topk`), the op skips the zeros of the kept input;
  - R-Sparse low-rank term: ``z = A (x - x_kept)`` is a complement-selected op call, then the
    main call adds ``lowrank_b @ z`` in its epilogue;
  - gated MLP: gate and up with one selection share one call over ``[Wg.T | Wu.T]``; with a gate
    mask (CATS/ProSparse) the gate is dense, `up` is computed only for kept rows
    (`output_sparse_rows`) and `down` skips the zero rows of its input.
Inputs of more than `max_batch` tokens (prefill) run the reference path: kernels help decode.

`prepare(model)` packs, once, the input-major copies the ops read, as non-persistent buffers
(never saved): `actsparse_wt` (W.T) on input-sparse linears, `actsparse_lowrank_at` (A.T),
`actsparse_gate_up_t` on MLPs whose gate and up share one selection (instead of their own
copies), and a zero threshold `actsparse_zero`. Call `set_backend` again after changing any
sparsity state.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ActSparseError
from ..nn import SparseGatedMLP, SparseLinear
from . import Backend


def linear_reference(module: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """`SparseLinear`'s torch forward (mirrors `actsparse.nn`), for inputs kernels do not take."""
    mask = module.mask(x)
    if mask is None:
        return F.linear(x, module.weight, module.bias)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = F.linear(kept, module.weight, module.bias)
    if module.lowrank_a is not None:
        y = y + F.linear(F.linear(x - kept, module.lowrank_a), module.lowrank_b)
    return y


def _same_selection(a: SparseLinear, b: SparseLinear) -> bool:
    if a.mode != b.mode or a.mode == "dense" or a.rank or b.rank:
        return False
    if (a.score_scale is None) != (b.score_scale is None):
        return False
    if a.score_scale is not None and not torch.equal(a.score_scale, b.score_scale):
        return False
    if a.mode == "topk":
        return a.k == b.k
    return bool(torch.equal(a.threshold, b.threshold))


def _pack(module: torch.nn.Module, name: str, make: Callable[[], torch.Tensor], like: torch.Tensor, shape: tuple) -> None:
    """Register `make()` as buffer `name` unless an equal-shaped one is there (packs are derived
    from weights, which inference does not change)."""
    existing = getattr(module, name, None)
    if existing is None or existing.shape != shape or existing.dtype != like.dtype or existing.device != like.device:
        module.register_buffer(name, make().contiguous(), persistent=False)


def _pack_transposed(module: torch.nn.Module, name: str, weight: torch.Tensor) -> None:
    _pack(module, name, lambda: weight.detach().T, weight, tuple(weight.shape[::-1]))


def _pack_zero(module: torch.nn.Module, device: torch.device) -> None:
    zero = torch.zeros((), device=device)
    _pack(module, "actsparse_zero", lambda: zero, zero, ())


def _output_sparse_up(mlp: SparseGatedMLP) -> torch.Tensor | None:
    """The `up` rows a gate mask skips, when the MLP can take the output-sparse path."""
    if mlp.gate_mode == "dense":
        return None
    if mlp.gate_up_linear is not None:
        gu = mlp.gate_up_linear
        if gu.mode != "dense" or gu.bias is not None:
            return None
        return gu.weight[mlp.intermediate_size:]
    up = mlp.up_linear
    if up.mode != "dense" or up.bias is not None:
        return None
    return up.weight


def make_backend(
    name: str,
    input_sparse_linear: Callable[..., torch.Tensor],
    output_sparse_rows: Callable[..., torch.Tensor],
    max_batch: int,
    check_model: Callable[[torch.nn.Module], None],
    set_hint: Callable[[torch.Tensor, float], None] = lambda weight, sparsity: None,
) -> Backend:
    def prepare(model: torch.nn.Module) -> None:
        check_model(model)
        fused: set[int] = set()
        for module in model.modules():
            if isinstance(module, SparseGatedMLP):
                fused |= _prepare_mlp(module)
        for module in model.modules():
            if isinstance(module, SparseLinear):
                # Only meters call a fused gate/up alone; they get the reference.
                module.actsparse_fused = id(module) in fused
                if module.actsparse_fused and hasattr(module, "actsparse_wt"):
                    del module.actsparse_wt
                if module.mode != "dense" and not module.actsparse_fused:
                    _pack_transposed(module, "actsparse_wt", module.weight)
                    _pack_zero(module, module.weight.device)
                    set_hint(module.actsparse_wt, module.target)
                    if module.rank:
                        _pack_transposed(module, "actsparse_lowrank_at", module.lowrank_a)

    def _prepare_mlp(mlp: SparseGatedMLP) -> set[int]:
        """Packs the MLP's fused gate+up when their selections agree; returns their ids then."""
        down = mlp.down_linear
        _pack_zero(mlp, down.weight.device)
        gate, up = mlp.gate_linear, mlp.up_linear
        fused: set[int] = set()
        if mlp.gate_mode == "dense" and gate is not None and _same_selection(gate, up):
            shape = (gate.in_features, gate.out_features + up.out_features)
            _pack(mlp, "actsparse_gate_up_t", lambda: torch.cat([gate.weight.detach().T, up.weight.detach().T], dim=1), gate.weight, shape)
            if gate.bias is not None:
                _pack(mlp, "actsparse_gate_up_bias", lambda: torch.cat([gate.bias.detach(), up.bias.detach()]), gate.bias, shape[1:])
            set_hint(mlp.actsparse_gate_up_t, gate.target)
            fused = {id(gate), id(up)}
        elif hasattr(mlp, "actsparse_gate_up_t"):
            del mlp.actsparse_gate_up_t
        rows = _output_sparse_up(mlp)
        if rows is not None:
            set_hint(rows, mlp.gate_target)
            if down.mode == "dense":  # `down` still skips the zeros the gate mask leaves
                _pack_transposed(down, "actsparse_wt", down.weight)
                set_hint(down.actsparse_wt, mlp.gate_target)
        return fused

    def packed(module: torch.nn.Module, buffer: str) -> torch.Tensor:
        tensor = getattr(module, buffer, None)
        if tensor is None:
            raise ActSparseError(
                f"{type(module).__name__} has no {buffer}: select the {name!r} backend with "
                f"actsparse.kernels.set_backend(model, {name!r}), which packs the weights"
            )
        return tensor

    def run_input_sparse(module: SparseLinear, x2: torch.Tensor) -> torch.Tensor:
        wt = packed(module, "actsparse_wt")
        if module.mode == "threshold":
            kept, threshold, scale = x2, module.threshold, module.score_scale
        else:
            kept = torch.where(module.mask(x2), x2, torch.zeros((), dtype=x2.dtype, device=x2.device))
            threshold, scale = module.actsparse_zero, None
        z = None
        if module.rank:
            at = module.actsparse_lowrank_at
            if module.mode == "threshold":
                z = input_sparse_linear(x2, at, threshold, scale, None, None, None, True)
            else:
                z = input_sparse_linear(x2 - kept, at, module.actsparse_zero, None, None, None, None, False)
        return input_sparse_linear(kept, wt, threshold, scale, module.bias, module.lowrank_b if z is not None else None, z, False)

    def linear(module: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // module.in_features
        if module.mode == "dense" or tokens > max_batch or module.actsparse_fused:
            return linear_reference(module, x)
        y = run_input_sparse(module, x.reshape(tokens, module.in_features).contiguous())
        return y.reshape(*x.shape[:-1], module.out_features)

    def gated_mlp(mlp: SparseGatedMLP, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // mlp.hidden_size
        if tokens > max_batch:
            return mlp._forward_reference(x)
        x2 = x.reshape(tokens, mlp.hidden_size).contiguous()
        rows = _output_sparse_up(mlp)
        if rows is not None:
            y = _gate_driven(mlp, x2, rows)
        else:
            y = mlp.down_linear(_gated_product(mlp, x2))
        return y.reshape(*x.shape[:-1], mlp.hidden_size)

    def _gated_product(mlp: SparseGatedMLP, x2: torch.Tensor) -> torch.Tensor:
        """act(gate) (masked) * up, through whichever linears the MLP has."""
        fused = getattr(mlp, "actsparse_gate_up_t", None)
        g, u = _fused_gate_up(mlp, x2, fused) if fused is not None else mlp.gate_and_up(x2)
        return mlp.masked_product(g, u)[1]

    def _fused_gate_up(mlp: SparseGatedMLP, x2: torch.Tensor, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = mlp.gate_linear  # `up` has the same selection (checked by prepare)
        bias = getattr(mlp, "actsparse_gate_up_bias", None)
        if gate.mode == "threshold":
            gu = input_sparse_linear(x2, fused, gate.threshold, gate.score_scale, bias, None, None, False)
        else:
            kept = torch.where(gate.mask(x2), x2, torch.zeros((), dtype=x2.dtype, device=x2.device))
            gu = input_sparse_linear(kept, fused, mlp.actsparse_zero, None, bias, None, None, False)
        return gu.chunk(2, dim=-1)

    def _gate_driven(mlp: SparseGatedMLP, x2: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if mlp.gate_up_linear is not None:
            gu = mlp.gate_up_linear
            g = F.linear(x2, gu.weight[: mlp.intermediate_size], None if gu.bias is None else gu.bias[: mlp.intermediate_size])
        else:
            g = mlp.gate_linear(x2)
        a = mlp.act_fn(g)
        if mlp.gate_mode == "threshold":
            threshold = mlp.gate_threshold
        else:
            a = torch.where(mlp.gate_mask(a), a, torch.zeros((), dtype=a.dtype, device=a.device))
            threshold = mlp.actsparse_zero
        m = output_sparse_rows(x2, a, threshold, rows)
        down = mlp.down_linear
        if down.mode != "dense":
            return down(m)
        return input_sparse_linear(m, packed(down, "actsparse_wt"), mlp.actsparse_zero, None, down.bias, None, None, False)

    return Backend(name=name, linear=linear, gated_mlp=gated_mlp, prepare=prepare)
