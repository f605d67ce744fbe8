"""`SparseLinear`: an input-sparse linear, one module for accuracy and speed.

It replaces an `nn.Linear` in place, keeping `weight`/`bias` under the same names, and adds its
sparsity state as buffers: a threshold or a top-K count on the score ``|x_i| * scale_i``
(scale = 1 for TEAL, the weight's column norms for WINA/R-Sparse), and an optional low-rank path
``B (A (x - x_kept))`` that carries the dropped channels (R-Sparse).

With `set_kernels(True)` it runs through the `actsparse::` ops (the kernels of its tensors'
device) on decode batches of up to `ops.MAX_BATCH` tokens, over an input-major copy of its weight
(`packed_weight_t`, non-persistent) that every setter keeps in step with the sparsity state;
otherwise, and for longer inputs, the torch reference below. Linears that read one input with one
selection (q/k/v) can share one packed weight and one kernel call (`share_input`).

The low-rank path runs folded: ``W (x*m) + B A (x*(1-m)) = (W - B A)(x*m) + B (A x)``, so the
kernels read ``(W - B A)`` over the kept channels and ``z = A x`` is a plain dense product, taken
before the selection (one product for a whole group), not a second sparse call over the dropped
channels.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ActSparseError
from ..kernels import batching, ops
from .meter import ReadMeter
from .packing import fold_lowrank, lowrank_sources, pack, pack_lowrank, pack_zero

MODES = ("dense", "threshold", "topk")


def select_mask(
    x: torch.Tensor, mode: str, threshold: torch.Tensor | None, k: int, scale: torch.Tensor | None
) -> torch.Tensor:
    """Which entries of x are kept, per token: score = |x| (* scale), computed in fp32."""
    score = x.detach().abs().float()
    if scale is not None:
        score = score * scale
    if mode == "threshold":
        return score > threshold
    if mode == "topk":
        return ops.topk_mask(score, k)
    raise ActSparseError(f"select_mask: mode must be threshold or topk, got {mode!r}")


def dense_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through `actsparse::dense_linear` (x: [..., in])."""
    x2 = x.reshape(-1, weight.shape[1]).contiguous()
    return ops.dense_linear(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def same_selection(a: "SparseLinear", b: "SparseLinear") -> bool:
    """Whether two linears keep the same inputs of any x."""
    if a.mode != b.mode or a.mode == "dense":
        return False
    if (a.score_scale is None) != (b.score_scale is None):
        return False
    if a.score_scale is not None and not torch.equal(a.score_scale, b.score_scale):
        return False
    if a.mode == "topk":
        return a.k == b.k
    return bool(torch.equal(a.threshold, b.threshold))


class SharedInput:
    """Linears that read one input with one selection (q/k/v), run as one kernel call over the
    weights packed on the first member. The attention calls them one by one on the same tensor:
    the first call computes every member's output, the others wait, with the input they belong
    to, until each is asked for (any other input is computed afresh)."""

    def __init__(self, members: list["SparseLinear"]) -> None:
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.input: torch.Tensor | None = None
        self.waiting: dict[int, torch.Tensor] = {}

    def take(self, member: "SparseLinear", x: torch.Tensor) -> torch.Tensor | None:
        if self.input is not x:
            return None
        y = self.waiting.pop(self.members.index(member), None)
        if not self.waiting:
            self.input = None
        return y

    def keep(self, member: "SparseLinear", x: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        index = self.members.index(member)
        self.input = x
        self.waiting = {i: y for i, y in enumerate(outputs) if i != index}
        return outputs[index]

    def dissolve(self) -> None:
        """Each member back on its own weight (a member's sparsity state changed)."""
        for m in self.members:
            m._listeners.remove(self.dissolve)
            m._group = None
            m._repack()


class SparseLinear(nn.Module):
    """An input-sparse linear; in "dense" mode it is bitwise `nn.Linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.mode = "dense"
        self.k = in_features
        self.target = 0.0  # the configured sparsity, kept for reports and the kernels' launch configs
        self.register_buffer("threshold", torch.tensor(float("-inf")))
        self.register_buffer("score_scale", None)  # [in], fp32
        self.register_buffer("lowrank_a", None)  # [rank, in]  (S_r V_r^T)
        self.register_buffer("lowrank_b", None)  # [out, rank] (U_r)
        self.kernels = False
        self.dense_kernel = False  # dense mode through `actsparse::dense_linear` (set_kernels)
        self.meter: ReadMeter | None = None
        for name in ("packed_weight_t", "packed_weight", "packed_bias", "packed_lowrank_a", "packed_lowrank_b", "packed_zero"):
            self.register_buffer(name, None, persistent=False)
        self._packed_by_owner = False  # a fused gate+up of the MLP holding this linear
        self._group: SharedInput | None = None
        self._listeners: list[Callable[[], None]] = []
        self.batch_seconds: dict[int, tuple[float, float]] = {}  # (kernel s, dense s) by batch size (`batching`)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.threshold = new.threshold.to(linear.weight.device)
        return new

    # -- state -------------------------------------------------------------------------
    def set_dense(self) -> None:
        self.mode, self.target = "dense", 0.0
        self._state_changed()

    def set_threshold(self, threshold: float, target: float, scale: torch.Tensor | None = None) -> None:
        self.mode, self.target = "threshold", float(target)
        self.threshold = torch.tensor(float(threshold), device=self.weight.device)
        self._set_scale(scale)
        self._state_changed()

    def set_topk(self, k: int, target: float, scale: torch.Tensor | None = None) -> None:
        if not 1 <= k <= self.in_features:
            raise ActSparseError(f"top-K needs 1 <= k <= {self.in_features}, got {k}")
        self.mode, self.k, self.target = "topk", int(k), float(target)
        self._set_scale(scale)
        self._state_changed()

    def set_lowrank(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
            raise ActSparseError(
                f"low-rank factors {tuple(a.shape)} x {tuple(b.shape)} do not fit a "
                f"{self.out_features}x{self.in_features} linear"
            )
        self.register_buffer("lowrank_a", a.to(self.weight.device, self.weight.dtype).contiguous())
        self.register_buffer("lowrank_b", b.to(self.weight.device, self.weight.dtype).contiguous())
        self._state_changed()

    def set_kernels(self, enabled: bool, dense: bool = False) -> None:
        """Run through the `actsparse::` ops (the kernels of the tensors' device) or, with
        False, the torch reference (`actsparse.runtime.use_kernels` sets a whole model).
        `dense`: decode batches in dense mode run `actsparse::dense_linear` too (on devices
        where its kernel beats torch's matvec, `runtime.DENSE_KERNEL_DEVICES`)."""
        self.kernels = bool(enabled)
        self.dense_kernel = bool(enabled and dense)
        self._state_changed()

    def set_meter(self, meter: ReadMeter | None) -> None:
        """Count this module's weight reads into `meter` (`actsparse.measure`); None stops."""
        self.meter = meter

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever this module's sparsity state changes (its owner's packs)."""
        self._listeners.append(callback)

    def _set_scale(self, scale: torch.Tensor | None) -> None:
        if scale is None:
            self.score_scale = None
            return
        if scale.shape != (self.in_features,):
            raise ActSparseError(f"score scale must have shape ({self.in_features},), got {tuple(scale.shape)}")
        # a copy of its own: linears given one tensor (a shared selection) must still save apart
        self.register_buffer("score_scale", scale.detach().float().to(self.weight.device, copy=True))

    def _state_changed(self) -> None:
        self.batch_seconds.clear()
        for callback in list(self._listeners):
            callback()
        self._repack()

    def _set_packed_by_owner(self, packed: bool) -> None:
        self._packed_by_owner = packed
        self._repack()

    def _repack(self) -> None:
        self.batch_seconds.clear()
        running = self.kernels and self.mode != "dense"
        lead = self._group is not None and self._group.members[0] is self
        if lead:
            members = self._group.members
            shape = (self.in_features, sum(m.out_features for m in members))
            if self.mode == "dense":  # one dense_linear call over the members' weights, output-major
                pack(self, "packed_weight", lambda: torch.cat([m.weight.detach() for m in members]), self.weight, shape[::-1],
                     sources=tuple(m.weight for m in members))
                pack(self, "packed_weight_t", None)
            else:
                pack(self, "packed_weight_t", lambda: torch.cat([m.kernel_weight().T for m in members], dim=1), self.weight, shape,
                     sources=sum((m.kernel_sources() for m in members), ()))
                pack(self, "packed_weight", None)
            pack(self, "packed_bias", (lambda: torch.cat([m.bias.detach() for m in members])) if self.bias is not None else None,
                 self.weight, shape[1:], sources=tuple(m.bias for m in members) if self.bias is not None else None)
            pack_lowrank(self, members if running else [])
        else:
            own = running and self._group is None and not self._packed_by_owner
            pack(self, "packed_weight_t", (lambda: self.kernel_weight().T) if own else None, self.weight,
                 (self.in_features, self.out_features), sources=self.kernel_sources())
            pack(self, "packed_weight", None)
            pack(self, "packed_bias", None)
            pack_lowrank(self, [])
        if running:
            pack_zero(self, self.weight.device)

    def kernel_weight(self) -> torch.Tensor:
        """The weight the kernels read over the kept channels (``W - B A`` with a low-rank path)."""
        return fold_lowrank(self.weight, self.lowrank_a, self.lowrank_b)

    def kernel_sources(self) -> tuple[torch.Tensor, ...]:
        return lowrank_sources(self.weight, self.lowrank_a, self.lowrank_b)

    @staticmethod
    def share_input(members: list["SparseLinear"]) -> bool:
        """Pack `members` (linears that the model calls on one input, e.g. q, k, v) as one weight
        on the first, when they all run kernels with one selection, or all the dense kernel, and
        bias alike; the group dissolves when any member's state changes. Returns whether they
        were grouped."""
        sparse = all(m.kernels and same_selection(members[0], m) for m in members)
        dense = all(m.dense_kernel and m.mode == "dense" and not m.rank for m in members)
        if not (sparse or dense) or any(m._group is not None for m in members):
            return False
        if len({m.bias is None for m in members}) != 1:
            return False
        group = SharedInput(members)
        for m in members:
            m._group = group
            m._listeners.append(group.dissolve)
            m._repack()
        return True

    @property
    def rank(self) -> int:
        return 0 if self.lowrank_a is None else self.lowrank_a.shape[0]

    def spec(self) -> dict[str, Any]:
        """What `from_spec` needs to rebuild this module's shape before loading its tensors."""
        return {
            "kind": "SparseLinear",
            "mode": self.mode,
            "k": self.k,
            "target": self.target,
            "scale": self.score_scale is not None,
            "rank": self.rank,
        }

    def apply_spec(self, spec: dict[str, Any]) -> None:
        self.mode, self.k, self.target = spec["mode"], int(spec["k"]), float(spec["target"])
        if self.mode not in MODES:
            raise ActSparseError(f"unknown SparseLinear mode {self.mode!r}")
        if spec["scale"]:
            self.register_buffer("score_scale", torch.empty(self.in_features, device=self.weight.device))
        if spec["rank"]:
            r = int(spec["rank"])
            dev, dt = self.weight.device, self.weight.dtype
            self.register_buffer("lowrank_a", torch.empty(r, self.in_features, device=dev, dtype=dt))
            self.register_buffer("lowrank_b", torch.empty(self.out_features, r, device=dev, dtype=dt))
        self._state_changed()

    # -- compute -----------------------------------------------------------------------
    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.mode == "dense":
            return None
        return select_mask(x, self.mode, self.threshold, self.k, self.score_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels and self.mode != "dense":
            y = self._kernel_forward(x)
            if y is not None:
                if self.meter is not None:
                    self._record(x, self.mask(x))
                return y
        elif self.dense_kernel and self.mode == "dense" and x.numel() // self.in_features <= ops.MAX_BATCH:
            if self.meter is not None:
                self._record(x, None)
            if self._group is None:
                return dense_forward(x, self.weight, self.bias)
            y = self._group.take(self, x)
            if y is None:
                lead = self._group.members[0]
                parts = dense_forward(x, lead.packed_weight, lead.packed_bias).split(self._group.sizes, dim=-1)
                y = self._group.keep(self, x, tuple(parts))
            return y
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The torch forward: what the kernels compute."""
        mask = self.mask(x)
        if self.meter is not None:
            self._record(x, mask)
        if mask is None:
            return F.linear(x, self.weight, self.bias)
        kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        y = F.linear(kept, self.weight, self.bias)
        if self.lowrank_a is not None:
            y = y + F.linear(F.linear(x - kept, self.lowrank_a), self.lowrank_b)
        return y

    def kernel_input(self, x2: torch.Tensor, zero: torch.Tensor) -> tuple:
        """(input, threshold, scale) of an op call with this selection: a threshold is applied by
        the op itself; top-K keeps its input's k entries first (the op then skips the zeros)."""
        if self.mode == "threshold":
            return x2, self.threshold, self.score_scale
        return ops.topk_kept(x2, self.k, self.score_scale), zero, None

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The ops' output, or None where the reference runs (prefill, a weight packed by the
        MLP for its fused gate+up, a batch the dense products run faster)."""
        tokens = x.numel() // self.in_features
        if tokens > ops.MAX_BATCH:
            return None
        if self._group is not None:
            y = self._group.take(self, x)
            return y if y is not None else self._group_forward(x, tokens)
        if self.packed_weight_t is None:
            return None
        x2 = x.reshape(tokens, self.in_features).contiguous()
        if not batching.kernel_pays(self.batch_seconds, tokens, lambda: self._run(x2), lambda: F.linear(x2, self.weight), x.device):
            return None
        return self._run(x2).reshape(*x.shape[:-1], self.out_features)

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        kept, threshold, scale = self.kernel_input(x2, self.packed_zero)
        z = F.linear(x2, self.lowrank_a) if self.rank else None
        return ops.input_sparse_linear(kept, self.packed_weight_t, threshold, scale, self.bias,
                                       self.lowrank_b if self.rank else None, z, self.target)

    def _group_forward(self, x: torch.Tensor, tokens: int) -> torch.Tensor | None:
        group = self._group
        lead = group.members[0]
        x2 = x.reshape(tokens, lead.in_features).contiguous()
        b = lead.packed_lowrank_b

        def call() -> torch.Tensor:
            kept, threshold, scale = lead.kernel_input(x2, lead.packed_zero)
            z = F.linear(x2, lead.packed_lowrank_a) if b is not None else None
            return ops.input_sparse_linear(kept, lead.packed_weight_t, threshold, scale, lead.packed_bias, b, z, lead.target)

        if not batching.kernel_pays(lead.batch_seconds, tokens, call,
                                    lambda: [F.linear(x2, m.weight) for m in group.members], x.device):
            return None
        outputs = tuple(part.reshape(*x.shape[:-1], part.shape[-1]) for part in call().split(group.sizes, dim=-1))
        return group.keep(self, x, outputs)

    def _record(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        tokens = x.numel() // self.in_features
        kept_cols = (x != 0) if mask is None else (mask & (x != 0))
        reads = kept_cols.sum().item() * self.out_features
        reads += tokens * self.rank * (self.in_features + self.out_features)
        self.meter.add(tokens, reads)

    def extra_repr(self) -> str:
        extra = f", mode={self.mode}, target={self.target:.3g}"
        if self.mode == "topk":
            extra += f", k={self.k}"
        if self.rank:
            extra += f", rank={self.rank}"
        return f"in_features={self.in_features}, out_features={self.out_features}{extra}"
