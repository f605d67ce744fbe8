"""What one vLLM linear computes from its Hugging Face members' state: plain torch and `actsparse::` ops.

A vLLM linear may hold several Hugging Face linears side by side in its output (q/k/v, gate/up);
they read one input, each with its own selection. `LayerPlan` splits the output into runs of
members with one selection (q/k/v with equal thresholds are one run, one op call) and, for a
merged gate/up, applies the MLP's gate mask to the `up` half: vLLM's activation then computes
``act(gate) * where(mask, up, 0)``, which is actsparse's ``where(mask, act(gate), 0) * up``. With a
dense `up`, the kernels compute only the `up` rows some token keeps (`actsparse::output_sparse_rows`);
the MLP's down projection then skips the zero rows of its input.

Nothing here depends on vLLM, so it is tested against actsparse's own modules without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels import ops
from .state import GateMask, Selection

DENSE = Selection(float("-inf"), None, 0.0)
ZERO_SKIP = Selection(0.0, None, 0.0)  # keeps every non-zero entry: the product is unchanged


@dataclass
class Run:
    """Output columns [start, stop) of the layer, read with one selection."""

    start: int
    stop: int
    selection: Selection
    weight_t: torch.Tensor | None = None  # [in, stop - start], the kernels' input-major pack
    threshold: torch.Tensor | None = None  # on the weight's device, as the ops take it
    scale: torch.Tensor | None = None


@dataclass
class Meter:
    """Zero counts of what this layer's weights read (`measure`)."""

    masked: int = 0  # input entries (per member run) the selection dropped
    inputs: int = 0
    gate_masked: int = 0  # gate/up: intermediate entries the gate mask dropped
    gate_total: int = 0


@dataclass
class LayerPlan:
    runs: list[Run]
    gate: GateMask | None = None  # gate/up only: the mask on |act(gate)|, gate = first half
    act: Callable[[torch.Tensor], torch.Tensor] | None = None
    kernels: bool = False  # decode batches through the ops (set by `prepare`)
    meter: Meter | None = None
    up_rows: torch.Tensor | None = field(default=None, repr=False)  # gate-driven `up` weight [J, in]
    zero: torch.Tensor | None = None

    @classmethod
    def build(cls, sizes: list[int], selections: list[Selection | None], gate: GateMask | None = None,
              act: Callable[[torch.Tensor], torch.Tensor] | None = None, zero_skip: bool = False) -> "LayerPlan":
        """`sizes`: output columns of each member (on this rank); `selections`: theirs (None: dense);
        `zero_skip`: the input has zeros worth skipping (the down projection of a gate-masked MLP)."""
        default = ZERO_SKIP if zero_skip else DENSE
        chosen = [s if s is not None else default for s in selections]
        runs: list[Run] = []
        start = 0
        for index, (size, selection) in enumerate(zip(sizes, chosen)):
            # a gate-masked up half is its own run: the kernels compute it gate-driven
            joins = runs and runs[-1].selection.same_as(selection) and not (gate is not None and index == 1)
            if joins:
                runs[-1].stop += size
            else:
                runs.append(Run(start, start + size, selection))
            start += size
        return cls(runs, gate, act)

    def prepare(self, weight: torch.Tensor, kernels: bool) -> None:
        """Per-run state on the weight's device and, with `kernels`, the ops' packs."""
        self.kernels = kernels
        for run in self.runs:
            run.threshold = torch.tensor(run.selection.threshold, device=weight.device)
            run.scale = None if run.selection.scale is None else run.selection.scale.to(weight.device)
            # dense runs keep torch's product, as actsparse's dense linears do
            packed = kernels and run.selection.threshold != float("-inf")
            run.weight_t = weight[run.start:run.stop].T.contiguous() if packed else None
        if kernels and self._gate_driven():
            up = self.runs[1]
            self.up_rows = weight[up.start:up.stop].contiguous()
            self.zero = torch.zeros((), device=weight.device)

    def _gate_driven(self) -> bool:
        return self.gate is not None and len(self.runs) == 2 and self.runs[1].selection.threshold == float("-inf")

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        kernels = self.kernels and x2.shape[0] <= ops.MAX_BATCH
        if kernels:
            x2 = x2.contiguous()
        if self.gate is None:
            outs = [self._run(x2, weight, bias, run, kernels) for run in self.runs]
        else:
            outs = self._gated(x2, weight, bias, kernels)
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _run(self, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, run: Run, kernels: bool) -> torch.Tensor:
        b = None if bias is None else bias[run.start:run.stop]
        if self.meter is not None and run.selection.threshold != float("-inf"):
            self.meter.masked += int((~_keep(x2, run)).sum())
            self.meter.inputs += x2.numel()
        if kernels and run.weight_t is not None:
            return ops.input_sparse_linear(x2, run.weight_t, run.threshold, run.scale, b, None, None,
                                           run.selection.target)
        if run.selection.threshold == float("-inf"):
            return F.linear(x2, weight[run.start:run.stop], b)
        kept = torch.where(_keep(x2, run), x2, torch.zeros((), dtype=x2.dtype, device=x2.device))
        return F.linear(kept, weight[run.start:run.stop], b)

    def _gated(self, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernels: bool) -> list[torch.Tensor]:
        """[gate, up masked by |act(gate)| > threshold]; `build` gives a gate-masked layer two runs."""
        gate = self._run(x2, weight, bias, self.runs[0], kernels)
        keep = self.act(gate).abs().float() > self.gate.threshold
        if self.meter is not None:
            self.meter.gate_masked += int((~keep).sum())
            self.meter.gate_total += keep.numel()
        up_run = self.runs[1]
        if kernels and self.up_rows is not None and bias is None:
            # only the up rows some token keeps are read; mask entries are 1 or 0
            up = ops.output_sparse_rows(x2, keep.to(x2.dtype), self.zero, self.up_rows, self.gate.target)
            return [gate, up]
        up = self._run(x2, weight, bias, up_run, kernels)
        return [gate, torch.where(keep, up, torch.zeros((), dtype=up.dtype, device=up.device))]


def _keep(x2: torch.Tensor, run: Run) -> torch.Tensor:
    score = x2.abs().float()
    if run.scale is not None:
        score = score * run.scale
    return score > run.threshold
