"""The modules that run: one input-sparse linear and one gated MLP, for every method and backend.

`SparseLinear` replaces an `nn.Linear` in place. It keeps `weight`/`bias` under the same names and
adds its sparsity state as buffers: a threshold or a top-K count on the score
``|x_i| * scale_i`` (scale = 1 for TEAL, the weight's column norms for WINA/R-Sparse), and an
optional low-rank path ``B (A (x - x_kept))`` that carries the dropped channels (R-Sparse).

`SparseGatedMLP` replaces a gated MLP and can mask the gate activation (CATS, ProSparse's
FATReLU): a zero of ``act(g)`` skips a row of `up` and a column of `down`.

Both run through a backend: "torch" is the reference written here; faster ones (Triton, CPU)
register themselves in `actsparse.kernels` and must compute the same function.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ActSparseError

MODES = ("dense", "threshold", "topk")


class ReadMeter:
    """Counts, for one module, the weight reads a token needs against the dense count."""

    def __init__(self, dense_reads_per_token: int) -> None:
        self.dense_reads_per_token = dense_reads_per_token
        self.tokens = 0
        self.reads = 0.0
        self.zeros = 0  # zero entries of the measured activation (MLP intermediate)
        self.entries = 0

    def add(self, tokens: int, reads: float) -> None:
        self.tokens += tokens
        self.reads += float(reads)

    def add_zeros(self, zeros: int, entries: int) -> None:
        self.zeros += int(zeros)
        self.entries += int(entries)

    @property
    def sparsity(self) -> float:
        if self.tokens == 0:
            return 0.0
        return 1.0 - self.reads / (self.tokens * self.dense_reads_per_token)


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
        return topk_mask(score, k)
    raise ActSparseError(f"select_mask: mode must be threshold or topk, got {mode!r}")


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest scores of each row. Of equal scores the lower index is kept first, so the
    kept set is the same on every device and backend (`torch.topk` leaves ties unspecified)."""
    kth = score.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = score > kth
    tied = score == kth
    room = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


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
        self.target = 0.0  # the configured sparsity, kept for reports
        self.register_buffer("threshold", torch.tensor(float("-inf")))
        self.register_buffer("score_scale", None)  # [in], fp32
        self.register_buffer("lowrank_a", None)  # [rank, in]  (S_r V_r^T)
        self.register_buffer("lowrank_b", None)  # [out, rank] (U_r)
        self.backend = "torch"
        self.meter: ReadMeter | None = None

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

    def set_threshold(self, threshold: float, target: float, scale: torch.Tensor | None = None) -> None:
        self.mode, self.target = "threshold", float(target)
        self.threshold = torch.tensor(float(threshold), device=self.weight.device)
        self._set_scale(scale)

    def set_topk(self, k: int, target: float, scale: torch.Tensor | None = None) -> None:
        if not 1 <= k <= self.in_features:
            raise ActSparseError(f"top-K needs 1 <= k <= {self.in_features}, got {k}")
        self.mode, self.k, self.target = "topk", int(k), float(target)
        self._set_scale(scale)

    def set_lowrank(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
            raise ActSparseError(
                f"low-rank factors {tuple(a.shape)} x {tuple(b.shape)} do not fit a "
                f"{self.out_features}x{self.in_features} linear"
            )
        self.register_buffer("lowrank_a", a.to(self.weight.device, self.weight.dtype).contiguous())
        self.register_buffer("lowrank_b", b.to(self.weight.device, self.weight.dtype).contiguous())

    def _set_scale(self, scale: torch.Tensor | None) -> None:
        if scale is None:
            self.score_scale = None
            return
        if scale.shape != (self.in_features,):
            raise ActSparseError(f"score scale must have shape ({self.in_features},), got {tuple(scale.shape)}")
        self.register_buffer("score_scale", scale.detach().float().to(self.weight.device))

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

    # -- compute -----------------------------------------------------------------------
    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.mode == "dense":
            return None
        return select_mask(x, self.mode, self.threshold, self.k, self.score_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend != "torch":
            from .kernels import get_backend

            y = get_backend(self.backend).linear(self, x)
            if self.meter is not None:
                self._record(x, self.mask(x))
            return y
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
        self.act_fn = act
        self.gate_mode = "dense"
        self.gate_k = 0
        self.gate_target = 0.0
        self.register_buffer("gate_threshold", torch.tensor(float("-inf")))
        self.backend = "torch"
        self.meter: ReadMeter | None = None

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

    def set_gate_threshold(self, threshold: float, target: float) -> None:
        self.gate_mode, self.gate_target = "threshold", float(target)
        self.gate_threshold = torch.tensor(float(threshold), device=self.gate_threshold.device)

    def set_gate_topk(self, k: int, target: float) -> None:
        if not 1 <= k <= self.intermediate_size:
            raise ActSparseError(f"gate top-K needs 1 <= k <= {self.intermediate_size}, got {k}")
        self.gate_mode, self.gate_k, self.gate_target = "topk", int(k), float(target)

    def spec(self) -> dict[str, Any]:
        return {"kind": "SparseGatedMLP", "gate_mode": self.gate_mode, "gate_k": self.gate_k, "gate_target": self.gate_target}

    def apply_spec(self, spec: dict[str, Any]) -> None:
        self.gate_mode, self.gate_k, self.gate_target = spec["gate_mode"], int(spec["gate_k"]), float(spec["gate_target"])
        if self.gate_mode not in MODES:
            raise ActSparseError(f"unknown SparseGatedMLP gate mode {self.gate_mode!r}")

    def gate_mask(self, a: torch.Tensor) -> torch.Tensor | None:
        if self.gate_mode == "dense":
            return None
        return select_mask(a, self.gate_mode, self.gate_threshold, self.gate_k, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend != "torch":
            from .kernels import get_backend

            if self.meter is not None:
                self._forward_reference(x)  # measures; the kernel's output is what is returned
            return get_backend(self.backend).gated_mlp(self, x)
        return self._forward_reference(x)

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

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        a, m = self.masked_product(*self.gate_and_up(x))
        if self.meter is not None:
            self._record(x, a, m)
        return self.down_linear(m)

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
