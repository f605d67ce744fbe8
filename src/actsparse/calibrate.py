"""Calibration: run token windows through the model with forward hooks that update streaming
statistics (histograms, fp64 covariances), then remove the hooks. No activation is kept."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ActSparseError


class Histogram:
    """A streaming distribution of non-negative scores on log-spaced bins, for quantiles.

    Bins cover 1e-10..1e6 (16 decades at ~0.4% relative width); exact zeros are counted apart
    so that a ReLU's zeros give a threshold of exactly 0."""

    LOW, HIGH, BINS = -10.0, 6.0, 16384

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.BINS, dtype=torch.float64)
        self.zeros = 0
        self.total = 0

    def update(self, scores: torch.Tensor) -> None:
        s = scores.detach().float().flatten()
        zero = s == 0
        self.zeros += int(zero.sum())
        self.total += s.numel()
        logs = s[~zero].clamp_min(10**self.LOW).log10().clamp_max(self.HIGH - 1e-6)
        self.counts += torch.histc(logs, bins=self.BINS, min=self.LOW, max=self.HIGH).double().cpu()

    def quantile(self, q: float) -> float:
        """The score t with a fraction q of the scores at or below it (0 for q inside the zeros)."""
        if self.total == 0:
            raise ActSparseError("calibration saw no activations for a layer")
        target = q * self.total - self.zeros
        if target <= 0:
            return 0.0
        cum = torch.cumsum(self.counts, 0)
        i = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64)))
        i = min(i, self.BINS - 1)
        before = float(cum[i - 1]) if i > 0 else 0.0
        inside = float(self.counts[i])
        frac = (target - before) / inside if inside > 0 else 1.0
        width = (self.HIGH - self.LOW) / self.BINS
        return 10 ** (self.LOW + (i + frac) * width)


class Covariance:
    """Uncentred second moment X^T X in fp64 (and the token count), for rotations."""

    def __init__(self, dim: int) -> None:
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.xtx += (x.T @ x).cpu()
        self.tokens += x.shape[0]


@dataclass
class Observer:
    """Call `fn` with the input (or output) of module `name` on every calibration forward."""

    name: str
    fn: Callable[[torch.Tensor], None]
    on: str = "input"


def run_calibration(
    model: nn.Module, batches: torch.Tensor | Iterable[torch.Tensor], observers: list[Observer], desc: str = "calibrating"
) -> None:
    """Forward every batch of token ids [b, L] with the observers hooked in; hooks are always removed."""
    if isinstance(batches, torch.Tensor):
        if batches.dim() != 2:
            raise ActSparseError(f"calibration tokens must be [n, seq_len], got shape {tuple(batches.shape)}")
        batches = list(batches.split(1))
    else:
        batches = list(batches)
    if not batches:
        raise ActSparseError("calibration needs at least one window of tokens")
    handles = []
    try:
        for obs in observers:
            module = model.get_submodule(obs.name)
            if obs.on == "input":
                handles.append(module.register_forward_pre_hook(lambda m, args, fn=obs.fn: fn(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, fn=obs.fn: fn(out)))
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, unit="seq", leave=False):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]||_2 for every input channel i, in fp32."""
    return weight.detach().float().norm(dim=0)


def topk_count(features: int, sparsity: float) -> int:
    """Entries kept per token by top-K at this sparsity (at least one)."""
    return max(1, min(features, int(round(features * (1.0 - sparsity)))))

