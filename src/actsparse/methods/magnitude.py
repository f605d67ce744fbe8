"""TEAL and WINA: zero the low-scoring entries of every linear's input.

TEAL scores by |x_i|; WINA by |x_i| * ||W[:, i]||_2. Thresholds are quantiles of the scores on
calibration data (then, by default, recalibrated on the sparsified model); with `selection="topk"` each token keeps exactly K entries.
"""
from __future__ import annotations

from ..calibrate import column_norms, topk_count
from ..config import TealConfig, WinaConfig
from ..models import iter_linears
from . import register
from .allocation import greedy_from_config
from .search import score_histograms


@register(TealConfig)
@register(WinaConfig)
def apply_magnitude(model, specs, config, calibration) -> dict:
    weighted = isinstance(config, WinaConfig)
    linears = {name: module for name, _, module in iter_linears(specs, model)}
    targets = {name: config.sparsity_for(name) for name in linears}
    active = [n for n, s in targets.items() if s]
    scales = {n: column_norms(linears[n].weight).to(linears[n].weight.device) if weighted else None for n in active}
    thresholds = config.selection == "threshold" and bool(active)
    hists = score_histograms(model, calibration, {n: scales[n] for n in active}, f"{config.method}: calibrating") if thresholds else {}

    def install(name: str, sparsity: float) -> None:
        module = linears[name]
        if sparsity <= 0:
            module.set_dense()
        elif config.selection == "topk":
            module.set_topk(topk_count(module.in_features, sparsity), sparsity, scales[name])
        else:
            module.set_threshold(hists[name].quantile(sparsity), sparsity, scales[name])

    allocation = {n: targets[n] for n in active}
    if config.allocation == "greedy" and active:
        allocation = greedy_from_config(model, specs, config, calibration, allocation, install)
    for name, sparsity in allocation.items():
        install(name, sparsity)
    if thresholds and config.recalibrate:
        hists = score_histograms(model, calibration, {n: scales[n] for n in active}, f"{config.method}: sparse pass")
        for name, sparsity in allocation.items():
            install(name, sparsity)
    return {"allocation": allocation}
