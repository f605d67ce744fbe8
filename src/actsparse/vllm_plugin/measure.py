"""Measured sparsity inside vLLM: the zero counts of every actsparse linear, summed by kind.

With ``ACTSPARSE_VLLM_MEASURE=1`` in the environment of the vLLM process, each actsparse linear
counts what its selection drops (`plan.Meter`; one host sync per count, for checks, not serving).
``LLM(...).apply_model(collect)`` returns, per linear kind (the last part of vLLM's module name,
e.g. ``qkv_proj``), the fraction of input entries dropped and, for ``gate``, the fraction of MLP
intermediate entries the gate mask dropped.
"""
from __future__ import annotations

from torch import nn

from ..errors import ActSparseError


def collect(model: nn.Module) -> dict[str, float]:
    counts: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        plan = getattr(module, "actsparse_plan", None)
        if plan is None:
            continue
        if plan.meter is None:
            raise ActSparseError("sparsity is measured only with ACTSPARSE_VLLM_MEASURE=1 set before vLLM starts")
        kind = name.rpartition(".")[2]
        for key, dropped, total in ((kind, plan.meter.masked, plan.meter.inputs),
                                    ("gate", plan.meter.gate_masked, plan.meter.gate_total)):
            if total:
                pair = counts.setdefault(key, [0, 0])
                pair[0] += dropped
                pair[1] += total
    return {key: dropped / total for key, (dropped, total) in sorted(counts.items())}
