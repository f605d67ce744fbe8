"""R-Sparse: exact weights for the high-scoring input channels, a rank-r SVD factor for the rest.

    y = W (x * m) + U_r S_r V_r^T (x * (1 - m)),   m_i = |x_i| * ||W[:, i]||_2 > t

This is the formula of the paper's code (the paper's text calls the non-sparse part a bias term;
its code applies the low-rank factor to the dropped channels, as here). Per linear, (s, alpha)
fixes the reads: a budget of in * out * (1 - s) weights per token, of which the share 1 - alpha buys
rank (each rank reads in + out weights) and the rest buys exact channels; the channel threshold is
the calibration quantile of the score at the channel sparsity that budget leaves. The measured
sparsity.model therefore counts the low-rank reads, as the core's meter does.

Factors are computed one linear at a time on the model's device (a randomized truncated SVD in
fp32; the "dropped" factors in fp64) and only the top-r are kept, in the model's dtype. The search
and the greedy allocation keep the top factors of every linear up to the largest rank they may try.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..calibrate import Covariance, Histogram, Observer, column_norms, run_calibration, topk_count
from ..config import RSparseConfig
from ..models import iter_linears
from ..nn import SparseLinear, dense_baseline
from . import register
from .allocation import greedy_from_config
from .search import budget_scaled, evolve, kl_from, lm_loss, log_probs, role_targets, score_observer

ALPHA_STEP = 0.05  # search grid for alpha: 1 - ALPHA_STEP * gene
ALPHA_GENES = 10  # so alpha >= 0.5
SPARSITY_STEP = 0.1  # relative per-layer sparsity: s * (1 + SPARSITY_STEP * gene), then rescaled
SPARSITY_GENES = 3


def rsparse_budget(in_features: int, out_features: int, sparsity: float, alpha: float) -> tuple[float, int]:
    """(channel sparsity, rank) for a linear at (s, alpha).

    rank r = floor(in * out * (1 - s) * (1 - alpha) / (in + out)) (the paper's r with
    k = in (1 - s) alpha); the reads the rounding leaves go to channels, so that
    kept channels * out + r * (in + out) = in * out * (1 - s) exactly."""
    dense = in_features * out_features
    rank = int(math.floor(dense * (1.0 - sparsity) * (1.0 - alpha) / (in_features + out_features) + 1e-9))
    channel_sparsity = sparsity + rank * (in_features + out_features) / dense
    return channel_sparsity, rank


OVERSAMPLE = 16  # extra random directions of the randomized SVD
POWER_ITERATIONS = 4
SVD_SEED = 0


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) = (S_r V_r^T [r, in], U_r [out, r]): the paper's factors, the top-r SVD of `weight`,
    on the weight's device.

    Only the top r are needed, so a randomized SVD (Halko et al., `torch.svd_lowrank`, r + 16
    directions, 4 power iterations) in fp32 gives them; its Frobenius error ||W - b a|| is within
    1% of the exact truncation's (`tests/test_rsparse.py`) at a few matmuls'
    cost, where an exact fp64 SVD of a 14336 x 4096 weight takes minutes on a CPU. Small or
    nearly full-rank problems take the exact SVD."""
    w = weight.detach()
    q = rank + OVERSAMPLE
    if 2 * q >= min(w.shape):
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        return (s[:rank, None] * vh[:rank]).float(), u[:, :rank].float().contiguous()
    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(SVD_SEED)  # its random directions: the same factors on every run
        u, s, v = torch.svd_lowrank(w.float(), q=q, niter=POWER_ITERATIONS)
    return (s[:rank, None] * v[:, :rank].T).contiguous(), u[:, :rank].contiguous()


def dropped_factors(weight: torch.Tensor, dropped_xtx: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) = (U_r^T W, U_r) with U_r the top-r eigenvectors of W C W^T, C = E[x_d x_d^T] the
    second moment of the dropped channels x_d = x * (1 - m) on calibration data.

    B A = U_r U_r^T W minimises E||W x_d - B A x_d||^2 over rank-r maps: the factor spends its rank
    on the directions the dropped channels actually reach, where the plain SVD (which minimises
    ||W - B A||_F, i.e. assumes isotropic x_d) spends it on W's largest singular directions.
    Computed in fp64 on the weight's device."""
    w = weight.detach().double()
    c = dropped_xtx.to(device=w.device, dtype=torch.float64)
    if w.shape[0] <= w.shape[1]:  # the top-r left singular vectors of W C^(1/2), from the smaller side
        _, vectors = torch.linalg.eigh(w @ c @ w.T)
        u = vectors[:, -rank:].flip(1)
    else:
        values, vectors = torch.linalg.eigh(c)
        u = torch.linalg.svd(w @ (vectors * values.clamp_min(0).sqrt()), full_matrices=False).U[:, :rank]
    return (u.T @ w).float(), u.float().contiguous()


def clear_lowrank(module: SparseLinear) -> None:
    module.lowrank_a = None
    module.lowrank_b = None


Factors = Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]


def precomputed(factors: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]], max_rank: dict[str, int],
                dtype: torch.dtype, desc: str) -> Factors:
    """`factors` computed once per linear at the largest rank it may take (one linear at a time,
    with a progress bar), kept in the model's dtype, then sliced (the factors of both kinds are
    nested in the rank)."""
    store = {}
    for name in tqdm([n for n, r in max_rank.items() if r], desc=desc, unit="linear", leave=False):
        a, b = factors(name, max_rank[name])
        store[name] = (a.to(dtype), b.to(dtype))

    def get(name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = store[name]
        return a[:rank], b[:, :rank]

    return get


class RSparseInstaller:
    """Puts linears in their R-Sparse state for a plan {name: (s, alpha)}. Members of a `group`
    (linears reading one input, with one score scale) that the plan makes sparse share one
    channel threshold: the quantile at their channel sparsities' mean weighted by output width,
    so their reads together stay the plan's."""

    def __init__(self, linears: dict[str, SparseLinear], config: RSparseConfig, scales: dict, hists: dict,
                 factors: Factors, groups: list[tuple[str, ...]]) -> None:
        self.linears, self.config, self.scales, self.hists, self.factors = linears, config, scales, hists, factors
        self.groups = groups

    def __call__(self, plan: dict[str, tuple[float, float]]) -> dict[str, dict]:
        budgets = {n: rsparse_budget(self.linears[n].in_features, self.linears[n].out_features, s, a)
                   for n, (s, a) in plan.items() if s > 0}
        channel = {n: c for n, (c, _) in budgets.items()}
        for group in self.groups:
            members = [n for n in group if n in budgets]
            if len(members) > 1:
                outs = {n: self.linears[n].out_features for n in members}
                shared = sum(outs[n] * channel[n] for n in members) / sum(outs.values())
                channel.update(dict.fromkeys(members, shared))
        states = {}
        for name, (sparsity, alpha) in plan.items():
            module = self.linears[name]
            if name not in budgets:  # dense: no budget to share with a low-rank path
                clear_lowrank(module)
                module.set_dense()
                states[name] = {"sparsity": 0.0, "alpha": alpha, "rank": 0, "channel_sparsity": 0.0}
                continue
            rank = budgets[name][1]
            if rank == 0:
                clear_lowrank(module)
            else:
                module.set_lowrank(*self.factors(name, rank))
            scale = self.scales[name]
            if self.config.selection == "topk":
                module.set_topk(topk_count(module.in_features, channel[name]), sparsity, scale)
            else:
                module.set_threshold(self.hists[name].quantile(channel[name]), sparsity, scale)
            states[name] = {"sparsity": sparsity, "alpha": alpha, "rank": rank, "channel_sparsity": channel[name]}
        return states


def selection_groups(specs, active: list[str], shared: bool) -> list[tuple[str, ...]]:
    """The active linears that select as one (`RSparseConfig.shared_selection`), group by group."""
    if not shared:
        return []
    groups = [tuple(n for n in group if n in active) for spec in specs for group in spec.shared_inputs()]
    return [g for g in groups if len(g) > 1]


def selection_scales(linears: dict[str, SparseLinear], active: list[str], groups: list[tuple[str, ...]],
                     score: str) -> dict[str, torch.Tensor | None]:
    """Each active linear's score scale: None for "magnitude"; for "wina" its weight's column norms,
    or, in a group, those of the group's concatenated weight (one tensor for all its members)."""
    if score != "wina":
        return dict.fromkeys(active)
    scales = {n: column_norms(linears[n].weight).to(linears[n].weight.device) for n in active}
    for group in groups:
        # each member's squared column norms as shares of its own total: a narrow k/v counts as
        # much as a wide q
        shared = sum(scales[n].square() / scales[n].square().sum() for n in group).sqrt()
        scales.update(dict.fromkeys(group, shared))
    return scales


@register(RSparseConfig)
def apply_rsparse(model, specs, config: RSparseConfig, calibration) -> dict:
    named = {name: (role, module) for name, role, module in iter_linears(specs, model)}
    linears = {n: m for n, (_, m) in named.items()}
    sizes = {n: m.weight.numel() for n, m in linears.items()}
    targets = role_targets(config, {n: r for n, (r, _) in named.items()}, sizes, dict(config.role_coefficients))
    active = [n for n, s in targets.items() if s]
    groups = selection_groups(specs, active, config.shared_selection)
    scales = selection_scales(linears, active, groups, config.score)
    thresholds = config.selection == "threshold"
    hists = _shared_histograms(model, calibration, active, groups, scales, "rsparse: calibrating") if thresholds else {}

    search = config.allocation in ("search", "greedy+search") and bool(active)
    greedy = config.allocation in ("greedy", "greedy+search") and bool(active)
    lowest_alpha = 1.0 - ALPHA_STEP * ALPHA_GENES if search else config.alpha
    max_rank = {n: rsparse_budget(linears[n].in_features, linears[n].out_features,
                                  0.0 if search or greedy else targets[n], lowest_alpha)[1] for n in active}
    dtype = next(model.parameters()).dtype
    factors = precomputed(lambda name, rank: svd_factors(linears[name].weight, rank), max_rank, dtype, "rsparse: SVDs")
    # With dense-activation thresholds and SVD factors (which stand in for "dropped" until the
    # second pass has measured the dropped channels): the greedy search and the start plan.
    first = RSparseInstaller(linears, config, scales, hists, factors, groups)
    if greedy:  # linear by linear: a group's members share their selection once the plan is whole
        targets = greedy_from_config(model, specs, config, calibration, {n: config.sparsity_for(n) for n in active},
                                     lambda name, sparsity: first({name: (sparsity, config.alpha)}))
    plan = {n: (targets[n], config.alpha) for n in active}
    recalibrate = config.recalibrate and thresholds
    if (recalibrate or config.lowrank == "dropped") and active:
        # Second pass on the model as sparsified by the start plan: the dropped channels' second
        # moments, and the scores as the sparse upstream layers really deliver them.
        first(plan)
        dropped = {n: Covariance(linears[n].in_features) for n in active if max_rank[n]} if config.lowrank == "dropped" else {}
        observers = [Observer(n, _dropped_observer(linears[n], c)) for n, c in dropped.items()]
        if recalibrate:
            hists, observe = _histograms_to_fill(active, groups, scales)
            observers += observe
        run_calibration(model, calibration, observers, desc="rsparse: sparse pass")
        if dropped:
            moments = {n: c.xtx / max(c.tokens, 1) for n, c in dropped.items()}
            factors = precomputed(lambda name, rank: dropped_factors(linears[name].weight, moments.pop(name), rank),
                                  max_rank, dtype, "rsparse: dropped-channel factors")
    install = RSparseInstaller(linears, config, scales, hists, factors, groups)
    recipe: dict = {}
    if search:
        layer_of = {name: spec.index for spec in specs for name in spec.linear_names().values()}
        plan, recipe["search"] = _search(model, config, calibration, install, sizes, layer_of, targets, active)
    recipe["allocation"] = {n: s for n, (s, _) in plan.items()}
    recipe["linears"] = install(plan)
    return recipe


def _histograms_to_fill(active: list[str], groups: list[tuple[str, ...]], scales: dict) -> tuple[dict, list[Observer]]:
    """A score histogram for every active linear (one per group, its members share it: they see
    one input with one scale) and the observers that fill them."""
    first_of = {n: n for n in active}
    for group in groups:
        first_of.update(dict.fromkeys(group, group[0]))
    own = {n: Histogram() for n in dict.fromkeys(first_of.values())}
    observers = [Observer(n, score_observer(h, scales[n])) for n, h in own.items()]
    return {n: own[first_of[n]] for n in active}, observers


def _shared_histograms(model, calibration, active, groups, scales, desc: str) -> dict[str, Histogram]:
    if not active:
        return {}
    hists, observers = _histograms_to_fill(active, groups, scales)
    run_calibration(model, calibration, observers, desc=desc)
    return hists


def _dropped_observer(module: SparseLinear, covariance: Covariance):
    return lambda x: covariance.update(torch.where(module.mask(x), torch.zeros((), dtype=x.dtype), x))


def _search(model, config, calibration, install, sizes, layer_of, targets, active):
    """Evolutionary search over per-layer alpha (and per-layer sparsity), fitness = LM loss or KL
    to the dense model (`config.search_fitness`)."""
    layers = sorted({layer_of[n] for n in active})
    position = {l: i for i, l in enumerate(layers)}
    with_sparsity = config.search_over == "alpha+sparsity"
    windows = calibration[: config.search_windows]
    budget = sum(sizes[n] * targets[n] for n in active) / sum(sizes[n] for n in active)

    def decode(genes: list[int]) -> dict[str, tuple[float, float]]:
        sparsity = {n: targets[n] for n in active}
        if with_sparsity:
            relative = {n: targets[n] * (1 + SPARSITY_STEP * genes[len(layers) + position[layer_of[n]]]) for n in active}
            sparsity = budget_scaled({n: sizes[n] for n in active}, relative, budget)
        return {n: (sparsity[n], 1.0 - ALPHA_STEP * genes[position[layer_of[n]]]) for n in active}

    if config.search_fitness == "kl":
        with dense_baseline(model):
            reference = log_probs(model, windows)

    def fitness(genes: list[int]) -> float:
        install(decode(genes))
        return kl_from(model, windows, reference) if config.search_fitness == "kl" else lm_loss(model, windows)

    start_gene = min(ALPHA_GENES, max(0, round((1.0 - config.alpha) / ALPHA_STEP)))
    start = [start_gene] * len(layers)
    bounds = [(0, ALPHA_GENES)] * len(layers)
    if with_sparsity:
        start += [0] * len(layers)
        bounds += [(-SPARSITY_GENES, SPARSITY_GENES)] * len(layers)
    result = evolve(fitness, start, bounds, config.search_population, config.search_generations,
                    config.search_seed, desc="rsparse: search")
    summary = {
        "over": config.search_over,
        "fitness": config.search_fitness,
        "seed": config.search_seed,
        "windows": int(windows.shape[0]),
        "evaluations": result.evaluations,
        "start_loss": result.start_loss,
        "loss": result.loss,
        "history": result.history,
        "genes": result.genes,
    }
    return decode(result.genes), summary
