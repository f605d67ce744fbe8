"""rsparse-kl: R-Sparse followed by a calibration-time KL tune (`RSparseKlConfig`).

After the method has set every linear's selection state, the decoder linears' weights are tuned
with Adam to minimise KL(dense || sparse) of the next-token distributions on the calibration
windows. The teacher is the same model under `dense_baseline` with the update switched off, so
no second copy of the model is held. The update (a full fp32 delta, or a rank-r ``B A``) is a
`torch.nn.utils.parametrize` parametrization of each weight while it is tuned, then folded in.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..config import RSparseKlConfig
from ..errors import ActSparseError
from ..nn import SparseLinear, dense_baseline
from . import register
from .rsparse import apply_rsparse

# Bytes a tuned weight costs on top of the model: the fp32 update, its gradient, Adam's two moments.
FULL_UPDATE_BYTES = 16


class WeightUpdate(nn.Module):
    """``W -> W + delta`` (rank 0: a full fp32 delta) or ``W + B A`` (rank r), zero at the start,
    so the tune starts from the method's model; `enabled` False gives W itself (the teacher)."""

    def __init__(self, weight: torch.Tensor, rank: int):
        super().__init__()
        out_features, in_features = weight.shape
        kw = dict(device=weight.device, dtype=torch.float32)
        if rank:
            self.a = nn.Parameter(torch.randn(rank, in_features, **kw) / in_features**0.5)
            self.b = nn.Parameter(torch.zeros(out_features, rank, **kw))
        else:
            self.delta = nn.Parameter(torch.zeros(out_features, in_features, **kw))
        self.rank = rank
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        update = self.b @ self.a if self.rank else self.delta
        return (weight.float() + update).to(weight.dtype)


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware; elsewhere autocast emulates it, far slower
    than fp32 (15x on an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # the checks torch's own CPU code paths use
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def tune_autocast(asked: bool | None, device: torch.device) -> bool:
    """`kl_autocast` resolved on `device`: unset, bf16 where it is native; forced on where it is
    not, a warning that the tune will be slow."""
    native = bf16_is_native(device)
    if asked is None:
        return native
    if asked and not native:
        print(f"actsparse: kl_autocast=true on {device}, which has no bf16 arithmetic in hardware: the tune "
              "emulates bf16 and runs far slower than in fp32 (leave kl_autocast unset to choose by the device)",
              file=sys.stderr, flush=True)
    return asked


def free_bytes(device: torch.device) -> int | None:
    """Memory free on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_update_fits(weights: int, rank: int, free: int | None, device: torch.device) -> None:
    """Refuse, before any slow work, a full-weight tune of `weights` decoder weights that cannot
    fit the `free` bytes of `device` (with a fifth left for activations)."""
    need = weights * FULL_UPDATE_BYTES
    if rank or free is None or need <= 0.8 * free:
        return
    raise ActSparseError(
        f"kl_rank=0 tunes every decoder weight in full: {need / 2**30:.1f} GiB beyond the model "
        f"({weights / 1e9:.2f}B weights x {FULL_UPDATE_BYTES} bytes), {free / 2**30:.1f} GiB free on {device}; "
        "set kl_rank (e.g. --option kl_rank=64) or kl_steps=0"
    )


@contextlib.contextmanager
def _teacher(model: nn.Module, updates: list[WeightUpdate]):
    """The dense model: sparsity off, the update not applied."""
    for u in updates:
        u.enabled = False
    try:
        with torch.no_grad(), dense_baseline(model):
            yield
    finally:
        for u in updates:
            u.enabled = True


def rate_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """The share of the peak rate at `step`: a linear ramp over the first `warmup` steps, then
    constant or a half cosine reaching zero after the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def kl_tune_(model: nn.Module, windows: torch.Tensor, steps: int, lr: float, rank: int, desc: str,
             autocast: bool = False, schedule: str = "constant", warmup: int = 0, weight_decay: float = 0.0) -> dict:
    """Tune the decoder linears' weights of sparsified `model` in place (see the module's
    docstring) on token windows [n, L], one a step, the forwards under bf16 autocast if asked, the
    rate by `rate_factor`, the update decayed towards zero (the method's weights) by AdamW's
    `weight_decay`; returns the first and last steps' KL."""
    linears = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if not steps or not linears:
        return {"steps": 0}
    if windows.shape[0] < steps:
        print(f"actsparse: {desc}: {windows.shape[0]} calibration windows for {steps} steps, each used "
              f"{steps / windows.shape[0]:.1f} times (more windows, e.g. --calib-samples {steps}, tune better)",
              file=sys.stderr, flush=True)
    grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    updates = [WeightUpdate(m.weight, rank) for m in linears]
    for m, u in zip(linears, updates):
        parametrize.register_parametrization(m, "weight", u)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for u in updates for p in u.parameters()], lr=lr, weight_decay=weight_decay)
    rates = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: rate_factor(step, steps, schedule, warmup))
    history = []
    try:
        for step in tqdm(range(steps), desc=desc, unit="step", leave=False):
            ids = windows[step % windows.shape[0]][None].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                with _teacher(model, updates):
                    teacher = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1).flatten(0, 1)
                student = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1).flatten(0, 1)
            kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            kl.backward()
            rate = opt.param_groups[0]["lr"]
            opt.step()
            rates.step()
            history.append(kl.item())
    finally:
        with torch.no_grad():
            for m in linears:
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        for name, p in model.named_parameters():
            p.requires_grad_(grad_before.get(name, True))
    return {"steps": steps, "rank": rank, "lr": lr, "schedule": schedule, "warmup": warmup, "weight_decay": weight_decay,
            "lr_last": rate, "windows": int(windows.shape[0]),
            "autocast": autocast, "kl_first": history[0], "kl_last": sum(history[-10:]) / len(history[-10:])}


@register(RSparseKlConfig)
def apply_rsparse_kl(model, specs, config: RSparseKlConfig, calibration) -> dict:
    if config.kl_steps and config.sparsity > 0:
        device = next(model.parameters()).device
        weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, SparseLinear))
        check_update_fits(weights, config.kl_rank, free_bytes(device), device)
    recipe = apply_rsparse(model, specs, config, calibration[: config.statistics_windows])
    steps = config.kl_steps if config.sparsity > 0 else 0
    autocast = tune_autocast(config.kl_autocast, next(model.parameters()).device) if steps else False
    recipe["kl_tune"] = kl_tune_(model, calibration, steps, config.kl_lr, config.kl_rank,
                                 f"{config.method}: KL tune ({'bf16 autocast' if autocast else 'fp32'})",
                                 autocast, config.kl_schedule, config.kl_warmup, config.kl_weight_decay)
    return recipe
