"""Measured sparsity: what a token really skips, counted while the model runs.

``sparsity.model`` is the fraction of the decoder's linear-layer weight reads a token skips,
parameter-weighted (an input channel that is zero skips a weight column; a zero of a masked gate
activation skips a row of `up`; R-Sparse's low-rank factors count as reads).
``sparsity.mlp`` is the fraction of zero entries in the vector `down_proj` multiplies.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from .models import layer_specs
from .nn import ReadMeter, SparseGatedMLP, SparseLinear, output_sparse_up


@dataclass
class SparsityReport:
    model: float = 0.0
    mlp: float = 0.0
    attn: float = 0.0
    per_layer: list[dict] = field(default_factory=list)
    per_linear: dict[str, float] = field(default_factory=dict)
    tokens: int = 0

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "mlp": self.mlp,
            "attn": self.attn,
            "tokens": self.tokens,
            "per_layer": self.per_layer,
            "per_linear": self.per_linear,
        }


class SparsityMeter:
    """Holds the meters of one measurement; `report()` sums them up."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.linear_meters: dict[str, tuple[int, ReadMeter]] = {}  # name -> (layer index, meter)
        self.mlp_meters: dict[int, ReadMeter] = {}
        for spec in layer_specs(model):
            mlp = spec.mlp
            if not isinstance(mlp, SparseGatedMLP):
                raise TypeError("measure_sparsity needs a model prepared by actsparse (swap_modules)")
            skipped_by_gate = output_sparse_up(mlp)
            up_reads = 0
            if skipped_by_gate is not None:
                up_reads = skipped_by_gate.in_features * skipped_by_gate.out_features
            mlp_meter = ReadMeter(up_reads)
            self.mlp_meters[spec.index] = mlp_meter
            mlp.set_meter(mlp_meter)
            for name in spec.linear_names().values():
                linear = model.get_submodule(name)
                if linear is skipped_by_gate:
                    continue  # the MLP meter counts its reads
                meter = ReadMeter(linear.in_features * linear.out_features)
                linear.set_meter(meter)
                self.linear_meters[name] = (spec.index, meter)
            if skipped_by_gate is not None:
                self.linear_meters[_name_of(model, skipped_by_gate)] = (spec.index, mlp_meter)

    def detach(self) -> None:
        for module in self.model.modules():
            if isinstance(module, (SparseLinear, SparseGatedMLP)):
                module.set_meter(None)

    def report(self) -> SparsityReport:
        rep = SparsityReport()
        layers: dict[int, list[float]] = {}
        total_dense = total_reads = attn_dense = attn_reads = 0.0
        for name, (index, meter) in self.linear_meters.items():
            if meter.tokens == 0:
                continue
            dense = meter.dense_reads_per_token
            reads = meter.reads / meter.tokens
            rep.per_linear[name] = 1.0 - reads / dense
            acc = layers.setdefault(index, [0.0, 0.0])
            acc[0] += dense
            acc[1] += reads
            total_dense += dense
            total_reads += reads
            if ".mlp" not in name and "feed_forward" not in name:
                attn_dense += dense
                attn_reads += reads
            rep.tokens = max(rep.tokens, meter.tokens)
        zeros = sum(m.zeros for m in self.mlp_meters.values())
        entries = sum(m.entries for m in self.mlp_meters.values())
        for index in sorted(layers):
            dense, reads = layers[index]
            mlp_meter = self.mlp_meters[index]
            rep.per_layer.append(
                {
                    "layer": index,
                    "model": 1.0 - reads / dense,
                    "mlp": mlp_meter.zeros / mlp_meter.entries if mlp_meter.entries else 0.0,
                }
            )
        rep.model = 1.0 - total_reads / total_dense if total_dense else 0.0
        rep.attn = 1.0 - attn_reads / attn_dense if attn_dense else 0.0
        rep.mlp = zeros / entries if entries else 0.0
        return rep


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


@contextlib.contextmanager
def measure_sparsity(model: nn.Module) -> Iterator[SparsityMeter]:
    """Count reads while the block runs: ``with measure_sparsity(m) as meter: ...; meter.report()``."""
    meter = SparsityMeter(model)
    try:
        yield meter
    finally:
        meter.detach()
