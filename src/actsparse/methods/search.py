"""What R-Sparse and LaRoSA share: per-linear sparsity at a fixed model-level budget (coefficient
rescaling, a seeded evolutionary search) and the calibration of score thresholds.

`budget_scaled` turns relative sparsities (e.g. LaRoSA's 0.8 s / 1.2 s) into absolute ones whose
parameter-weighted mean is the target. `evolve` is a small genetic search over integer genes
(elitism, uniform crossover, +-1 step mutations), deterministic for a given seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibrate import Histogram, Observer, run_calibration
from ..errors import ActSparseError

MAX_LINEAR_SPARSITY = 0.95


def budget_scaled(sizes: dict[str, int], relative: dict[str, float], target: float,
                  cap: float = MAX_LINEAR_SPARSITY) -> dict[str, float]:
    """{name: min(cap, c * relative[name])} with c chosen so that the size-weighted mean is `target`."""
    total = sum(sizes.values())
    if not relative or target <= 0:
        return {n: 0.0 for n in relative}
    reachable = sum(sizes[n] * (cap if relative[n] > 0 else 0.0) for n in relative) / total
    if target > reachable + 1e-12:
        raise ActSparseError(
            f"sparsity {target:g} cannot be reached with every linear at most {cap:g} sparse "
            f"(at most {reachable:.3f} with these coefficients)"
        )

    def mean(c: float) -> float:
        return sum(sizes[n] * min(cap, c * relative[n]) for n in relative) / total

    lo, hi = 0.0, 1.0
    while mean(hi) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    return {n: min(cap, hi * relative[n]) for n in relative}


@torch.no_grad()
def lm_loss(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy over token windows [n, L]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for window in windows:
        ids = window[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


@torch.no_grad()
def log_probs(model: torch.nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Each token window's next-token log-probabilities [L, vocab], fp32."""
    device = next(model.parameters()).device
    return [F.log_softmax(model(input_ids=w[None].to(device), use_cache=False).logits[0].float(), -1) for w in windows]


@torch.no_grad()
def kl_from(model: torch.nn.Module, windows: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Mean per-token KL(reference || model) over token windows [n, L], `reference` from `log_probs`."""
    ours = log_probs(model, windows)
    total = sum(F.kl_div(o, r, log_target=True, reduction="sum").item() for o, r in zip(ours, reference))
    return total / sum(r.shape[0] for r in reference)


@dataclass
class SearchResult:
    genes: list[int]
    loss: float
    start_loss: float
    evaluations: int
    history: list[float] = field(default_factory=list)  # best loss after each generation


def evolve(
    fitness: Callable[[list[int]], float],
    start: Sequence[int],
    bounds: Sequence[tuple[int, int]],
    population: int,
    generations: int,
    seed: int,
    desc: str = "search",
) -> SearchResult:
    """Minimise `fitness` over integer vectors (gene i in bounds[i], inclusive), starting from `start`.

    The start vector is always in the population, so the result is never worse than it on the
    fitness. Each generation keeps the best half and refills the population with children of two
    elite parents (uniform crossover, then each gene moves +-1 with probability 2/n)."""
    rng = random.Random(seed)
    n = len(start)
    clip = lambda g: [min(hi, max(lo, v)) for v, (lo, hi) in zip(g, bounds)]
    cache: dict[tuple[int, ...], float] = {}

    def mutate(genes: list[int]) -> list[int]:
        rate = min(1.0, 2.0 / n)
        out = [v + rng.choice((-1, 1)) if rng.random() < rate else v for v in genes]
        if out == list(genes):  # always move at least one gene
            i = rng.randrange(n)
            out[i] += rng.choice((-1, 1))
        return clip(out)

    pool = [clip(list(start))]
    while len(pool) < population:
        pool.append(mutate(pool[0]))
    bar = tqdm(total=population + generations * (population - max(1, population // 2)), desc=desc, unit="eval", leave=False)

    def score(genes: list[int]) -> float:
        key = tuple(genes)
        if key not in cache:
            cache[key] = fitness(genes)
            bar.update(1)
            bar.set_postfix(best=f"{min(cache.values()):.4f}")
        return cache[key]

    try:
        ranked = sorted(pool, key=score)
        start_loss = score(clip(list(start)))
        history = [score(ranked[0])]
        for _ in range(generations):
            elite = ranked[: max(1, population // 2)]
            children = []
            while len(elite) + len(children) < population:
                a, b = rng.choice(elite), rng.choice(elite)
                child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
                children.append(mutate(child))
            ranked = sorted(elite + children, key=score)
            history.append(score(ranked[0]))
    finally:
        bar.close()
    return SearchResult(genes=ranked[0], loss=score(ranked[0]), start_loss=start_loss, evaluations=len(cache), history=history)


def role_targets(config, roles: dict[str, str], sizes: dict[str, int], coefficients: dict[str, float]) -> dict[str, float | None]:
    """Per-linear sparsity: None where `config.ignore` leaves a linear dense, the override where one
    matches, otherwise ``coefficients[role] * s`` (1 for unnamed roles) rescaled so that these
    linears' parameter-weighted mean is the target s."""
    import fnmatch

    targets: dict[str, float | None] = {}
    free = []
    for name in roles:
        value = config.sparsity_for(name)
        targets[name] = value
        if value is not None and not any(fnmatch.fnmatchcase(name, p) for p, _ in config.overrides):
            free.append(name)
    relative = {n: coefficients.get(roles[n], 1.0) for n in free}
    if len(set(relative.values())) > 1:
        targets.update(budget_scaled({n: sizes[n] for n in free}, relative, config.sparsity))
    return targets


def score_observer(hist: Histogram, scale: torch.Tensor | None) -> Callable[[torch.Tensor], None]:
    """Feeds a linear's input scores |x_i| (* scale_i, in fp32 as `select_mask` computes them) to `hist`."""
    if scale is None:
        return lambda x: hist.update(x.abs())
    return lambda x: hist.update(x.abs().float() * scale)


def score_histograms(model, calibration: torch.Tensor, scales: dict[str, torch.Tensor | None], desc: str) -> dict[str, Histogram]:
    """One calibration pass: the score distribution of every named linear's input."""
    hists = {n: Histogram() for n in scales}
    run_calibration(model, calibration, [Observer(n, score_observer(hists[n], scales[n])) for n in scales], desc=desc)
    return hists
