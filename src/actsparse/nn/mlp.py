"""`SparseGatedMLP`: ``down(mask(act(gate(x))) * up(x))``, replacing a gated MLP in place.

It can mask the gate activation (CATS, ProSparse's FATReLU): a zero of ``act(g)`` skips a row of
`up` and a column of `down`. With kernels on (`set_kernels`), it decides its packs whenever its own
or a child linear's state changes: gate and up with one selection share one input-sparse call over
``[Wg.T | Wu.T]`` (columns interleaved in groups, so that one token's call returns
``act(gate) * up`` through `actsparse::input_sparse_gated`); with a gate mask, the gate is dense,
`up` is computed only for kept rows (`actsparse::output_sparse_rows`) and `down` skips the zero
rows of its input; gate and up with low-rank paths (R-Sparse) read their folded weights with one
``z = [A_g; A_u] x`` and a block-diagonal B (`packing.pack_lowrank`), added before the
activation; dense gate and up on the dense kernel (the CPU) are one `actsparse::dense_linear`
call over ``[Wg; Wu]``. Without a gate mask it is bitwise the HF gated MLP.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ActSparseError
from ..kernels import batching, ops
from .linear import MODES, SparseLinear, same_selection, select_mask
from .meter import ReadMeter
from .packing import (activation_name, gate_up_group, interleave_gate_up, pack, pack_lowrank, pack_transposed, pack_zero,
                      split_gate_up)


class SparseGatedMLP(nn.Module):
    """``down(mask(act(gate(x))) * up(x))``; with no gate mask it is bitwise the HF gated MLP."""

    def __init__(
        self,
        *,
        gate: SparseLinear | None,
        up: SparseLinear | None,
        gate_up: SparseLinear | None,
        down: SparseLinear,
        act: Callable[[torch.Tensor], torch.Tensor],
        names: tuple[str | None, str | None, str | None, str],
    ) -> None:
        super().__init__()
        # Keep the original attribute names so state-dict keys match the HF checkpoint.
        self._names = names
        gate_name, up_name, gate_up_name, down_name = names
        for name, module in ((gate_name, gate), (up_name, up), (gate_up_name, gate_up), (down_name, down)):
            if name is not None:
                self.add_module(name, module)
                module.on_change(self._repack)
        self.act_fn = act
        self.gate_mode = "dense"
        self.gate_k = 0
        self.gate_target = 0.0
        self.register_buffer("gate_threshold", torch.tensor(float("-inf")))
        self.kernels = False
        self.meter: ReadMeter | None = None
        for buffer in ("packed_gate_up_t", "packed_gate_up_bias", "packed_gate_up", "packed_down_t", "packed_lowrank_a",
                       "packed_lowrank_b", "packed_zero"):
            self.register_buffer(buffer, None, persistent=False)
        self._gate_up_group = 1
        self._gated_act: str | None = None
        self.batch_seconds: dict[int, tuple[float, float]] = {}  # (kernel s, dense s) by batch size (`batching`)

    @property
    def gate_linear(self) -> SparseLinear | None:
        return getattr(self, self._names[0]) if self._names[0] else None

    @property
    def up_linear(self) -> SparseLinear | None:
        return getattr(self, self._names[1]) if self._names[1] else None

    @property
    def gate_up_linear(self) -> SparseLinear | None:
        return getattr(self, self._names[2]) if self._names[2] else None

    @property
    def down_linear(self) -> SparseLinear:
        return getattr(self, self._names[3])

    @property
    def intermediate_size(self) -> int:
        return self.down_linear.in_features

    @property
    def hidden_size(self) -> int:
        return self.down_linear.out_features

    # -- state -------------------------------------------------------------------------
    def set_gate_dense(self) -> None:
        self.gate_mode, self.gate_target = "dense", 0.0
        self._repack()

    def set_gate_threshold(self, threshold: float, target: float) -> None:
        self.gate_mode, self.gate_target = "threshold", float(target)
        self.gate_threshold = torch.tensor(float(threshold), device=self.gate_threshold.device)
        self._repack()

    def set_gate_topk(self, k: int, target: float) -> None:
        if not 1 <= k <= self.intermediate_size:
            raise ActSparseError(f"gate top-K needs 1 <= k <= {self.intermediate_size}, got {k}")
        self.gate_mode, self.gate_k, self.gate_target = "topk", int(k), float(target)
        self._repack()

    def set_kernels(self, enabled: bool) -> None:
        """Run through the `actsparse::` ops or, with False, the torch reference (this module's
        own paths; its linears have their own `set_kernels`)."""
        self.kernels = bool(enabled)
        self._repack()

    def set_meter(self, meter: ReadMeter | None) -> None:
        """Count this module's weight reads into `meter` (`actsparse.measure`); None stops."""
        self.meter = meter

    def spec(self) -> dict[str, Any]:
        return {"kind": "SparseGatedMLP", "gate_mode": self.gate_mode, "gate_k": self.gate_k, "gate_target": self.gate_target}

    def apply_spec(self, spec: dict[str, Any]) -> None:
        self.gate_mode, self.gate_k, self.gate_target = spec["gate_mode"], int(spec["gate_k"]), float(spec["gate_target"])
        if self.gate_mode not in MODES:
            raise ActSparseError(f"unknown SparseGatedMLP gate mode {self.gate_mode!r}")
        self._repack()

    def output_sparse_rows(self) -> torch.Tensor | None:
        """The `up` rows a gate mask skips, when the MLP can take the output-sparse path."""
        if self.gate_mode == "dense":
            return None
        up = self.gate_up_linear if self.gate_up_linear is not None else self.up_linear
        if up.mode != "dense" or up.bias is not None:
            return None
        return up.weight[self.intermediate_size:] if self.gate_up_linear is not None else up.weight

    def _repack(self) -> None:
        """The packs the kernels read, decided from this module's and its linears' state."""
        self.batch_seconds.clear()
        gate, up, down = self.gate_linear, self.up_linear, self.down_linear
        fuse = self.kernels and self.gate_mode == "dense" and gate is not None and same_selection(gate, up)
        if gate is not None:
            gate._set_packed_by_owner(fuse)
            up._set_packed_by_owner(fuse)
        if fuse:
            group = gate_up_group(gate.out_features)
            shape = (gate.in_features, gate.out_features + up.out_features)
            pack(self, "packed_gate_up_t", lambda: interleave_gate_up(gate.kernel_weight().T, up.kernel_weight().T, group),
                 gate.weight, shape, sources=gate.kernel_sources() + up.kernel_sources())
            bias = (lambda: interleave_gate_up(gate.bias.detach()[None], up.bias.detach()[None], group)[0]) if gate.bias is not None else None
            pack(self, "packed_gate_up_bias", bias, gate.weight, shape[1:],
                 sources=(gate.bias, up.bias) if gate.bias is not None else None)
            self._gate_up_group = group
            pack_lowrank(self, [gate, up], group)
            # The kernels compute act(gate) * up in their epilogue for the activations they know.
            gated = group <= 256 and group & (group - 1) == 0
            self._gated_act = activation_name(self.act_fn) if gated else None
        else:
            pack(self, "packed_gate_up_t", None)
            pack(self, "packed_gate_up_bias", None)
            pack_lowrank(self, [])
            self._gated_act = None
        # dense gate and up (the dense kernel): one call over [Wg; Wu], output-major
        dense_fuse = (self.kernels and self.gate_mode == "dense" and gate is not None and gate.dense_kernel
                      and up.dense_kernel and gate.mode == up.mode == "dense" and not (gate.rank or up.rank)
                      and gate.bias is None and up.bias is None)
        pack(self, "packed_gate_up", (lambda: torch.cat([gate.weight.detach(), up.weight.detach()])) if dense_fuse else None,
             gate.weight if gate is not None else None, (2 * self.intermediate_size, self.hidden_size),
             sources=(gate.weight, up.weight) if dense_fuse else None)
        gate_driven = self.kernels and self.output_sparse_rows() is not None and down.mode == "dense"
        pack_transposed(self, "packed_down_t", down.weight if gate_driven else None)
        if self.kernels:
            pack_zero(self, down.weight.device)

    # -- compute -----------------------------------------------------------------------
    def gate_mask(self, a: torch.Tensor) -> torch.Tensor | None:
        if self.gate_mode == "dense":
            return None
        return select_mask(a, self.gate_mode, self.gate_threshold, self.gate_k, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels:
            y = self._kernel_forward(x)
            if y is not None:
                if self.meter is not None:
                    self.reference(x)  # measures; the kernels' output is what is returned
                return y
        return self.reference(x)

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_up_linear is not None:
            return self.gate_up_linear(x).chunk(2, dim=-1)
        return self.gate_linear(x), self.up_linear(x)

    def masked_product(self, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(act(g) with the gate mask applied, that times u): the MLP intermediate."""
        a = self.act_fn(g)
        mask = self.gate_mask(a)
        if mask is not None:
            a = torch.where(mask, a, torch.zeros((), dtype=a.dtype, device=a.device))
        return a, a * u

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """This module's torch forward (its linears run as they are set)."""
        a, m = self.masked_product(*self.gate_and_up(x))
        if self.meter is not None:
            self._record(x, a, m)
        return self.down_linear(m)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        tokens = x.numel() // self.hidden_size
        if tokens > ops.MAX_BATCH:
            return None
        x2 = x.reshape(tokens, self.hidden_size).contiguous()
        rows = self.output_sparse_rows()
        if rows is not None:
            if not batching.kernel_pays(self.batch_seconds, tokens, lambda: self._gate_driven(x2, rows),
                                        lambda: self._dense_products(x2), x.device):
                return None
            y = self._gate_driven(x2, rows)
        else:
            y = self.down_linear(self._gated_product(x2))
        return y.reshape(*x.shape[:-1], self.hidden_size)

    def _gated_product(self, x2: torch.Tensor) -> torch.Tensor:
        """act(gate) (masked) * up, through whichever linears the MLP has."""
        if self.packed_gate_up is not None:
            return self.masked_product(*ops.dense_linear(x2, self.packed_gate_up, None).chunk(2, dim=-1))[1]
        fused = self.packed_gate_up_t
        if fused is None:
            return self.masked_product(*self.gate_and_up(x2))[1]
        gate = self.gate_linear  # `up` has the same selection and the gate no mask (see _repack)
        kept, threshold, scale = gate.kernel_input(x2, self.packed_zero)
        bias, b = self.packed_gate_up_bias, self.packed_lowrank_b
        if self._gated_act is not None and x2.shape[0] == 1:
            z = F.linear(x2, self.packed_lowrank_a) if b is not None else None
            return ops.input_sparse_gated(kept, fused, threshold, scale, bias, b, z, self._gate_up_group, self._gated_act,
                                          gate.target)

        def call() -> torch.Tensor:
            z = F.linear(x2, self.packed_lowrank_a) if b is not None else None
            return ops.input_sparse_linear(kept, fused, threshold, scale, bias, b, z, gate.target)

        if not batching.kernel_pays(self.batch_seconds, x2.shape[0], call,
                                    lambda: (F.linear(x2, gate.weight), F.linear(x2, self.up_linear.weight)), x2.device):
            return self.masked_product(gate.reference(x2), self.up_linear.reference(x2))[1]
        return self.masked_product(*split_gate_up(call(), self._gate_up_group))[1]

    def _gate_driven(self, x2: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.gate_up_linear is not None:
            gu, j = self.gate_up_linear, self.intermediate_size
            g = F.linear(x2, gu.weight[:j], None if gu.bias is None else gu.bias[:j])
        else:
            g = self.gate_linear(x2)
        a = self.act_fn(g)
        if self.gate_mode == "threshold":
            threshold = self.gate_threshold
        else:
            a = ops.topk_kept(a, self.gate_k, None)
            threshold = self.packed_zero
        m = ops.output_sparse_rows(x2, a, threshold, rows, self.gate_target)
        down = self.down_linear
        if down.mode != "dense":
            return down(m)
        return ops.input_sparse_linear(m, self.packed_down_t, self.packed_zero, None, down.bias, None, None, self.gate_target)

    def _dense_products(self, x2: torch.Tensor) -> torch.Tensor:
        """The dense products of this MLP (what its kernels stand in for, timed against them)."""
        if self.gate_up_linear is not None:
            weight = self.gate_up_linear.weight
            gate, up = weight[: self.intermediate_size], weight[self.intermediate_size:]
        else:
            gate, up = self.gate_linear.weight, self.up_linear.weight
        F.linear(x2, up)
        return F.linear(F.linear(x2, gate), self.down_linear.weight)

    def _record(self, x: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> None:
        down = self.down_linear
        consumed = m if down.mode == "dense" else torch.where(down.mask(m), m, torch.zeros((), dtype=m.dtype))
        self.meter.add_zeros((consumed == 0).sum().item(), consumed.numel())
        if self.gate_mode != "dense":
            # Output sparsity: a zero of act(g) means that up row is never read.
            tokens = a.numel() // self.intermediate_size
            reads = (a != 0).sum().item() * self.hidden_size
            if self.gate_up_linear is not None:  # the fused gate half is always read
                reads += tokens * self.intermediate_size * self.hidden_size
            self.meter.add(tokens, reads)


def output_sparse_up(mlp: SparseGatedMLP) -> SparseLinear | None:
    """The linear whose rows a gate mask skips, when the MLP is gate-driven."""
    if mlp.gate_mode == "dense":
        return None
    return mlp.gate_up_linear if mlp.gate_up_linear is not None else mlp.up_linear
