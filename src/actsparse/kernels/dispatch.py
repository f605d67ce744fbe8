"""How a kernel backend runs `SparseLinear` and `SparseGatedMLP`, whatever the kernels are.

A backend here is a pair of ops with the semantics of `triton_ops.py`'s custom ops:
  input_sparse_linear(x, weight_t, threshold, scale, bias, lowrank_b, lowrank_z, complement)
  output_sparse_rows(x, a, threshold, weight)
`make_backend` turns them into an `actsparse.kernels.Backend` that computes exactly what the
torch reference in `actsparse.nn` computes:
  - threshold selection: the op compares the score with the module's threshold itself;
  - top-K selection: the kept input (zeros elsewhere) comes from the backend's `topk_kept` op,
    or from torch without one, and the op skips its zeros;
  - R-Sparse low-rank term: ``z = A (x - x_kept)`` is a complement-selected op call, then the
    main call adds ``lowrank_b @ z`` in its epilogue;
  - gated MLP: gate and up with one selection share one call over ``[Wg.T | Wu.T]`` (columns
    interleaved in groups, so that one token's call can return ``act(gate) * up`` when the
    backend has an `input_sparse_gated` op and the activation is one it computes); with a gate
    mask (CATS/ProSparse) the gate is dense, `up` is computed only for kept rows
    (`output_sparse_rows`) and `down` skips the zero rows of its input;
  - separate q/k/v with one selection (a `SharedInput` group): the attention calls them one by
    one on the same tensor, so the first call runs one kernel over ``[Wq.T | Wk.T | Wv.T]`` and
    keeps the other two slices for the next calls that pass that same tensor (any other input is
    computed afresh).
Inputs of more than `max_batch` tokens (prefill) run the reference path: kernels help decode.
Batches of 2 to `max_batch` tokens read every weight row some token keeps (the union of their
masks), which at moderate sparsity is most rows: with a `batch_timer`, a module (an MLP for its
gate+up call, or for its whole gate-driven path) runs its kernel on a batch only where that takes
less time than the dense products it replaces, measured on its first eager call at that batch size (`DecodeEngine` makes one
before compiling) and kept as ``actsparse_batch_seconds[tokens] = (kernel_s, dense_s)``; a batch
size first met inside torch.compile runs the reference.

`prepare(model)` packs, once, the input-major copies the ops read, as non-persistent buffers
(never saved): `actsparse_wt` (W.T) on input-sparse linears, `actsparse_lowrank_at` (A.T),
`actsparse_gate_up_t` on MLPs whose gate and up share one selection and `actsparse_group_t` on
the first linear of a q/k/v group (instead of their own copies), and a zero threshold
`actsparse_zero`. Call `set_backend` again after changing any
sparsity state.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ActSparseError
from ..models import layer_specs
from ..nn import SparseGatedMLP, SparseLinear, select_mask
from . import Backend


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
    """The kernels' name for an MLP activation module, or None for one they do not compute."""
    if isinstance(act, torch.nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return _ACTIVATION_NAMES.get(type(act).__name__)


class SharedInput:
    """Linears that read one input with one selection, run as one kernel call over their packed
    weights (on the first member, `actsparse_group_t`). A call computes every member's output;
    the outputs of the others wait, with the input they belong to, until each is asked for."""

    def __init__(self, members: list[SparseLinear]) -> None:
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.input: torch.Tensor | None = None
        self.waiting: dict[int, torch.Tensor] = {}

    def take(self, member: SparseLinear, x: torch.Tensor) -> torch.Tensor | None:
        """The output kept for `member` if the last group call was on this very tensor."""
        if self.input is not x:
            return None
        y = self.waiting.pop(self.members.index(member), None)
        if not self.waiting:
            self.input = None
        return y

    def keep(self, member: SparseLinear, x: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Keeps the other members' outputs for `x`; returns `member`'s."""
        index = self.members.index(member)
        self.input = x
        self.waiting = {i: y for i, y in enumerate(outputs) if i != index}
        return outputs[index]


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


def _attention_group(model: torch.nn.Module, names: dict[str, str]) -> list[SparseLinear] | None:
    """q, k and v when they are separate sparse linears with one selection and bias alike."""
    if not all(role in names for role in ("q", "k", "v")):
        return None
    members = [model.get_submodule(names[role]) for role in ("q", "k", "v")]
    if not all(isinstance(m, SparseLinear) for m in members):
        return None
    if not all(_same_selection(members[0], m) for m in members[1:]):
        return None
    if len({m.bias is None for m in members}) != 1:
        return None
    return members


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
    input_sparse_gated: Callable[..., torch.Tensor] | None = None,
    batch_timer: Callable[[Callable[[], object], Callable[[], object]], tuple[float, float]] | None = None,
    topk_kept: Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor] | None = None,
) -> Backend:
    keep_topk = topk_kept or topk_kept_reference

    def prepare(model: torch.nn.Module) -> None:
        check_model(model)
        for module in model.modules():
            if hasattr(module, "actsparse_batch_seconds"):
                del module.actsparse_batch_seconds  # measured under the old sparsity state
        fused: set[int] = set()
        for module in model.modules():
            if isinstance(module, SparseGatedMLP):
                fused |= _prepare_mlp(module)
        grouped: set[int] = set()
        for module in model.modules():
            if isinstance(module, SparseLinear):
                module.actsparse_shared = None
                if hasattr(module, "actsparse_group_t"):
                    del module.actsparse_group_t
        for spec in layer_specs(model):
            grouped |= _prepare_group(model, spec.linear_names())
        for module in model.modules():
            if isinstance(module, SparseLinear):
                # Only meters call a fused gate/up alone; they get the reference.
                module.actsparse_fused = id(module) in fused
                if (module.actsparse_fused or id(module) in grouped) and hasattr(module, "actsparse_wt"):
                    del module.actsparse_wt
                if module.mode != "dense" and not module.actsparse_fused and id(module) not in grouped:
                    _pack_transposed(module, "actsparse_wt", module.weight)
                    _pack_zero(module, module.weight.device)
                    set_hint(module.actsparse_wt, module.target)
                    if module.rank:
                        _pack_transposed(module, "actsparse_lowrank_at", module.lowrank_a)

    def _prepare_group(model: torch.nn.Module, names: dict[str, str]) -> set[int]:
        """Packs q/k/v as one weight when they share their selection; returns their ids then."""
        members = _attention_group(model, names)
        if members is None:
            return set()
        lead = members[0]
        shape = (lead.in_features, sum(m.out_features for m in members))
        _pack(lead, "actsparse_group_t", lambda: torch.cat([m.weight.detach().T for m in members], dim=1), lead.weight, shape)
        if lead.bias is not None:
            _pack(lead, "actsparse_group_bias", lambda: torch.cat([m.bias.detach() for m in members]), lead.bias, shape[1:])
        _pack_zero(lead, lead.weight.device)
        set_hint(lead.actsparse_group_t, lead.target)
        group = SharedInput(members)
        for m in members:
            m.actsparse_shared = group
        return {id(m) for m in members}

    def _prepare_mlp(mlp: SparseGatedMLP) -> set[int]:
        """Packs the MLP's fused gate+up when their selections agree; returns their ids then."""
        down = mlp.down_linear
        _pack_zero(mlp, down.weight.device)
        gate, up = mlp.gate_linear, mlp.up_linear
        fused: set[int] = set()
        if mlp.gate_mode == "dense" and gate is not None and _same_selection(gate, up):
            shape = (gate.in_features, gate.out_features + up.out_features)
            group = gate_up_group(gate.out_features)
            _pack(mlp, "actsparse_gate_up_t", lambda: interleave_gate_up(gate.weight.detach().T, up.weight.detach().T, group),
                  gate.weight, shape)
            if gate.bias is not None:
                _pack(mlp, "actsparse_gate_up_bias", lambda: interleave_gate_up(gate.bias.detach()[None], up.bias.detach()[None], group)[0],
                      gate.bias, shape[1:])
            mlp.actsparse_gate_up_group = group
            # The kernels compute act(gate) * up in their epilogue when they know the activation.
            gated = input_sparse_gated is not None and group <= 256 and group & (group - 1) == 0
            mlp.actsparse_gated_act = activation_name(mlp.act_fn) if gated else None
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

    def selected(module: SparseLinear, x2: torch.Tensor, zero: torch.Tensor) -> tuple:
        """(input, threshold, scale) of a kernel call with `module`'s selection: a threshold is
        applied by the op itself; top-K keeps its input's k entries first (the op then skips the
        zeros)."""
        if module.mode == "threshold":
            return x2, module.threshold, module.score_scale
        return keep_topk(x2, module.k, module.score_scale), zero, None

    def run_input_sparse(module: SparseLinear, x2: torch.Tensor) -> torch.Tensor:
        wt = packed(module, "actsparse_wt")
        kept, threshold, scale = selected(module, x2, module.actsparse_zero)
        z = None
        if module.rank:
            at = module.actsparse_lowrank_at
            if module.mode == "threshold":
                z = input_sparse_linear(x2, at, threshold, scale, None, None, None, True)
            else:
                z = input_sparse_linear(x2 - kept, at, module.actsparse_zero, None, None, None, None, False)
        return input_sparse_linear(kept, wt, threshold, scale, module.bias, module.lowrank_b if z is not None else None, z, False)

    def kernel_pays(owner: torch.nn.Module, tokens: int, kernel: Callable[[], object], dense: Callable[[], object]) -> bool:
        """Whether `owner` runs its kernel on this many tokens (see the module docstring)."""
        if tokens == 1 or batch_timer is None:
            return True
        measured = getattr(owner, "actsparse_batch_seconds", None)
        if measured is None or tokens not in measured:
            if torch.compiler.is_compiling():
                return False
            if measured is None:
                measured = owner.actsparse_batch_seconds = {}
            measured[tokens] = batch_timer(kernel, dense)
        kernel_s, dense_s = measured[tokens]
        return kernel_s < dense_s

    def linear(module: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // module.in_features
        if module.mode == "dense" or tokens > max_batch or module.actsparse_fused:
            return linear_reference(module, x)
        group = getattr(module, "actsparse_shared", None)
        if group is not None:
            y = group.take(module, x)
            return y if y is not None else run_group(group, module, x, tokens)
        x2 = x.reshape(tokens, module.in_features).contiguous()
        if not kernel_pays(module, tokens, lambda: run_input_sparse(module, x2), lambda: F.linear(x2, module.weight)):
            return linear_reference(module, x)
        return run_input_sparse(module, x2).reshape(*x.shape[:-1], module.out_features)

    def run_group(group: SharedInput, module: SparseLinear, x: torch.Tensor, tokens: int) -> torch.Tensor:
        lead = group.members[0]
        x2 = x.reshape(tokens, lead.in_features).contiguous()

        def call() -> torch.Tensor:
            kept, threshold, scale = selected(lead, x2, lead.actsparse_zero)
            return input_sparse_linear(kept, lead.actsparse_group_t, threshold, scale, getattr(lead, "actsparse_group_bias", None),
                                       None, None, False)

        if not kernel_pays(lead, tokens, call, lambda: [F.linear(x2, m.weight) for m in group.members]):
            return linear_reference(module, x)
        outputs = tuple(part.reshape(*x.shape[:-1], part.shape[-1]) for part in call().split(group.sizes, dim=-1))
        return group.keep(module, x, outputs)

    def gated_mlp(mlp: SparseGatedMLP, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // mlp.hidden_size
        if tokens > max_batch:
            return mlp._forward_reference(x)
        x2 = x.reshape(tokens, mlp.hidden_size).contiguous()
        rows = _output_sparse_up(mlp)
        if rows is not None:
            if not kernel_pays(mlp, tokens, lambda: _gate_driven(mlp, x2, rows), lambda: _dense_mlp(mlp, x2)):
                return mlp._forward_reference(x)
            y = _gate_driven(mlp, x2, rows)
        else:
            y = mlp.down_linear(_gated_product(mlp, x2))
        return y.reshape(*x.shape[:-1], mlp.hidden_size)

    def _gated_product(mlp: SparseGatedMLP, x2: torch.Tensor) -> torch.Tensor:
        """act(gate) (masked) * up, through whichever linears the MLP has."""
        fused = getattr(mlp, "actsparse_gate_up_t", None)
        if fused is None:
            return mlp.masked_product(*mlp.gate_and_up(x2))[1]
        gate = mlp.gate_linear  # `up` has the same selection and the gate no mask (checked by prepare)
        kept, threshold, scale = selected(gate, x2, mlp.actsparse_zero)
        bias = getattr(mlp, "actsparse_gate_up_bias", None)
        if mlp.actsparse_gated_act is not None and x2.shape[0] == 1:
            return input_sparse_gated(kept, fused, threshold, scale, bias, mlp.actsparse_gate_up_group, mlp.actsparse_gated_act)

        def call() -> torch.Tensor:
            return input_sparse_linear(kept, fused, threshold, scale, bias, None, None, False)

        if not kernel_pays(mlp, x2.shape[0], call, lambda: (F.linear(x2, gate.weight), F.linear(x2, mlp.up_linear.weight))):
            return mlp.masked_product(*mlp.gate_and_up(x2))[1]  # the fused linears run their reference
        return mlp.masked_product(*split_gate_up(call(), mlp.actsparse_gate_up_group))[1]

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
            a = keep_topk(a, mlp.gate_k, None)
            threshold = mlp.actsparse_zero
        m = output_sparse_rows(x2, a, threshold, rows)
        down = mlp.down_linear
        if down.mode != "dense":
            return down(m)
        return input_sparse_linear(m, packed(down, "actsparse_wt"), mlp.actsparse_zero, None, down.bias, None, None, False)

    return Backend(name=name, linear=linear, gated_mlp=gated_mlp, prepare=prepare)


def topk_kept_reference(x: torch.Tensor, k: int, scale: torch.Tensor | None) -> torch.Tensor:
    """What a backend's `topk_kept` op computes: x where its score is one of the k largest of
    its row (`SparseLinear`'s top-K selection), else 0."""
    return torch.where(select_mask(x, "topk", None, k, scale), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _dense_mlp(mlp: SparseGatedMLP, x2: torch.Tensor) -> torch.Tensor:
    """The dense products of a gated MLP (what its kernels stand in for, timed against them)."""
    if mlp.gate_up_linear is not None:
        weight = mlp.gate_up_linear.weight
        gate, up = weight[: mlp.intermediate_size], weight[mlp.intermediate_size:]
    else:
        gate, up = mlp.gate_linear.weight, mlp.up_linear.weight
    F.linear(x2, up)
    return F.linear(F.linear(x2, gate), mlp.down_linear.weight)
