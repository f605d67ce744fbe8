"""CATS: a threshold (or top-K) on |act(gate)|, so that its zeros skip `up` rows and `down` columns.

`sparsity` is the fraction of zero MLP intermediate activations (sparsity.mlp); the gate itself
is always read, so the model-level figure is about two thirds of the MLP's share of it.
"""
from __future__ import annotations

from ..calibrate import Histogram, Observer, run_calibration, topk_count
from ..config import CatsConfig
from . import register


@register(CatsConfig)
def apply_cats(model, specs, config, calibration) -> dict:
    targets = {spec.index: config.sparsity_for(f"{spec.mlp_prefix}.{spec.down}") for spec in specs}
    if config.selection == "topk":
        for spec in specs:
            s = targets[spec.index]
            if s:
                spec.mlp.set_gate_topk(topk_count(spec.mlp.intermediate_size, s), s)
        return {}
    hists = {spec.index: Histogram() for spec in specs if targets[spec.index]}
    observers = []
    for spec in specs:
        if spec.index not in hists:
            continue
        hist, act = hists[spec.index], spec.mlp.act_fn
        if spec.gate_up is not None:
            fn = lambda y, h=hist, a=act: h.update(a(y.chunk(2, dim=-1)[0]).abs())
            name = f"{spec.mlp_prefix}.{spec.gate_up}"
        else:
            fn = lambda y, h=hist, a=act: h.update(a(y).abs())
            name = f"{spec.mlp_prefix}.{spec.gate}"
        observers.append(Observer(name, fn, on="output"))
    run_calibration(model, calibration, observers, desc="cats: calibrating")
    thresholds = _install(specs, targets, hists)
    if config.recalibrate:  # the gate scores as the sparse upstream layers deliver them
        for hist in hists.values():
            hist.reset()
        run_calibration(model, calibration, observers, desc="cats: sparse pass")
        thresholds = _install(specs, targets, hists)
    return {"thresholds": thresholds}


def _install(specs, targets, hists) -> dict[str, float]:
    thresholds = {}
    for spec in specs:
        s = targets[spec.index]
        if s:
            t = hists[spec.index].quantile(s)
            spec.mlp.set_gate_threshold(t, s)
            thresholds[spec.mlp_prefix] = t
    return thresholds
