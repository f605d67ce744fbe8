"""The plain training loop: causal-LM loss plus lambda(step) times the MLP-intermediate L1 term.

With `distill` > 0 and a teacher (the model before ReLU-fication), the LM loss becomes
``(1 - distill) * CE + distill * KL(teacher || student)`` over every token's next-token
distribution: the teacher's full distribution carries far more signal per token than the one
label, which is what a ReLU-fied model has to recover from on a small token budget. With
`distill_hidden` > 0 the loss also adds that weight times the mean over decoder layers of the
student's normalized MSE to the teacher's hidden states (one teacher forward serves both terms).

AdamW with linear warm-up and cosine decay, gradient accumulation, gradient clipping, bf16
autocast (fp32 master weights) on CUDA, DDP when the process group is up (`distributed.setup`),
a CSV log (written by rank 0; every rank returns the same rows, reduced across ranks),
checkpoints that resume to the same next step, an optional wall-clock limit (stop at a checkpoint,
resume later) and optional regional torch.compile (each decoder layer).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..errors import ActSparseError
from ..models import decoder_layers
from .checkpoint import checkpoint_dir, find_checkpoint, load_checkpoint, read_meta, save_checkpoint
from .data import ShardedBatches
from .distill import LayerOutputs, hidden_mse, lm_and_kl
from .distributed import Dist
from .log import CsvLog
from .penalty import IntermediateL1
from .schedule import L1Schedule

LOG_FILE = "train_log.csv"
# A checkpoint resumes only a run that would have made the same steps from it.
RESUME_KEYS = ("steps", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "weight_decay", "seed", "world_size",
               "distill", "distill_hidden")


@dataclass(frozen=True)
class TrainArgs:
    """steps: optimizer steps; batch_size: sequences per micro-batch per rank; warmup: fraction
    of the steps with a linear LR ramp; log_every / save_every: in steps (save_every 0: no
    checkpoints); bf16: None means on for CUDA; distill: weight in [0, 1] of the KL to a teacher's
    next-token distribution in the loss (0: plain LM loss); distill_hidden: weight (>= 0) of the
    normalized MSE to the teacher's per-layer hidden states, added to the loss (0: off);
    time_limit: seconds of training in one `train` call (None: no limit), after which it stops at a
    checkpoint (see `train`); compile: compile each decoder layer of the student and the teacher
    in place with `nn.Module.compile` while training (they run eagerly again afterwards). A checkpoint
    resumes under other values of these two: they are not part of the run it belongs to."""

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.02
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool | None = None
    log_every: int = 10
    save_every: int = 0
    seed: int = 0
    distill: float = 0.0
    distill_hidden: float = 0.0
    time_limit: float | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ActSparseError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ActSparseError(f"save_every must be >= 0, got {self.save_every}")
        if not self.lr > 0:
            raise ActSparseError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ActSparseError(f"warmup must be in [0, 1) and min_lr_ratio in [0, 1], got {self.warmup}, {self.min_lr_ratio}")
        if not 0 <= self.distill <= 1:
            raise ActSparseError(f"distill must be in [0, 1], got {self.distill}")
        if not self.distill_hidden >= 0:
            raise ActSparseError(f"distill_hidden must be >= 0, got {self.distill_hidden}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ActSparseError(f"time_limit must be > 0 seconds (or None for no limit), got {self.time_limit}")

    @property
    def distills(self) -> bool:
        """Whether the loss has a term against a teacher."""
        return self.distill > 0 or self.distill_hidden > 0

    def lr_factor(self, step: int) -> float:
        warm = math.ceil(self.warmup * self.steps)
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: nn.Module,
    windows: torch.Tensor,
    schedule: L1Schedule,
    args: TrainArgs,
    out_dir: str | os.PathLike,
    *,
    l1_reduce: str = "sum",
    resume: str | os.PathLike | None = None,
    dist: Dist | None = None,
    meta: dict | None = None,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> list[dict]:
    """Train `model` (already on its device) in place on token windows [n, seq_len]; returns the
    logged rows. Checkpoints and the CSV log go under `out_dir`. `teacher` (frozen, on the same
    device) is required when `args.distill` or `args.distill_hidden` > 0.

    With `args.time_limit`, once more than that many seconds have passed since this call began
    training, the loop stops after the step it is on: it checkpoints that step, logs its row (on a
    `log_every` boundary or not) and returns. Whether it did: `finished(history, args)` is False.
    A later call with the same `args` (any time_limit) and `resume=out_dir` continues from there
    to the same weights as an uninterrupted run; its first row averages only the steps since the
    stop."""
    for name in ("distill", "distill_hidden"):
        if getattr(args, name) > 0 and teacher is None:
            raise ActSparseError(f"{name}={getattr(args, name)} needs a teacher model")
    device = next(model.parameters()).device
    dist = dist or Dist(device=device)
    out_dir = Path(out_dir)
    batches = ShardedBatches(windows, args.batch_size, dist.rank, dist.world_size, args.seed)
    run_meta = {**asdict(args), "world_size": dist.world_size, **(meta or {})}
    model.train()
    ddp = model
    if dist.enabled:
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, args.lr_factor)
    start = 0
    if resume is not None:
        found = find_checkpoint(resume)
        saved = read_meta(found)
        defaults = asdict(TrainArgs())  # a key a checkpoint predates had its default value
        differ = [k for k in RESUME_KEYS if saved.get(k, defaults.get(k)) != run_meta.get(k)]
        if "config" in saved and _as_json(saved["config"]) != _as_json(run_meta.get("config")):
            differ.append("config")
        if differ:
            raise ActSparseError(
                f"{found}: was written by a different run ({', '.join(f'{k}={saved.get(k)!r} here {run_meta.get(k)!r}' for k in differ)})"
            )
        start = load_checkpoint(found, model, optimizer, scheduler)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    tokens_per_step = args.batch_size * args.grad_accum * dist.world_size * windows.shape[1]
    history: list[dict] = []
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, kd, hidden, l1, micro-batches since the last log
    with contextlib.ExitStack() as cleanup:  # hooks and compiled layers are undone on every way out
        penalty = IntermediateL1(model, l1_reduce)
        cleanup.callback(penalty.remove)
        layer_outputs = None
        if args.distill_hidden > 0:
            layer_outputs = (LayerOutputs(model), LayerOutputs(teacher))
            for outputs in layer_outputs:
                cleanup.callback(outputs.remove)
        lm_kl = lm_and_kl
        if args.compile:
            for m in (model, teacher):
                if m is not None:
                    cleanup.enter_context(_compiled_layers(m))
            lm_kl = torch.compile(lm_and_kl)
        columns = ["step", "tokens", "lr", "lambda", "loss", "kd", "hidden", "l1", "sparsity"] + [f"sparsity_{i}" for i in range(penalty.layers)] + ["seconds"]
        log = CsvLog(out_dir / LOG_FILE, columns, resume_step=start if resume is not None else None) if dist.is_main else None
        began = time.perf_counter()
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="prosparse", unit="step",
                   file=sys.stderr, disable=not (progress and dist.is_main))
        done = start
        try:
            for step in bar:
                lam = schedule.lambda_at(step)
                lr = scheduler.get_last_lr()[0]
                for micro in range(args.grad_accum):
                    ids = batches.get(step * args.grad_accum + micro).to(device)
                    last = micro == args.grad_accum - 1
                    with (ddp.no_sync() if dist.enabled and not last else contextlib.nullcontext()):
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                            out = ddp(input_ids=ids, labels=ids if args.distill == 0 else None, use_cache=False)
                            loss, kd, hidden = _losses(out, teacher, ids, args, layer_outputs, lm_kl)
                        l1 = penalty.pop_term()
                        (((1 - args.distill) * loss + args.distill * kd + args.distill_hidden * hidden + lam * l1)
                         / args.grad_accum).backward()
                    sums += torch.stack([loss.detach().double(), kd.detach().double(), hidden.detach().double(),
                                         l1.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
                if args.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                stop = done < args.steps and _out_of_time(args.time_limit, began, dist, device)
                if done % args.log_every == 0 or done == args.steps or stop:
                    row = _log_row(done, done * tokens_per_step, lr, lam, sums, penalty, dist, time.perf_counter() - began)
                    sums.zero_()
                    history.append(row)
                    if log is not None:
                        log.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", l1=f"{row['l1']:.3g}", lam=f"{lam:.3g}", sparsity=f"{row['sparsity']:.3f}")
                if stop or (args.save_every and done % args.save_every == 0):
                    if dist.is_main:
                        save_checkpoint(checkpoint_dir(out_dir, done), model, optimizer, scheduler, done, run_meta)
                    dist.barrier()
                if stop:
                    break
        except KeyboardInterrupt:
            if dist.is_main and done > start:
                where = checkpoint_dir(out_dir, done)
                save_checkpoint(where, model, optimizer, scheduler, done, run_meta)
                print(f"actsparse: interrupted after step {done} of {args.steps}; checkpoint in {where}; "
                      f"to continue, run the same command with --resume {out_dir}", file=sys.stderr, flush=True)
            raise
    model.eval()
    return history


def finished(history: list[dict], args: TrainArgs) -> bool:
    """Whether the `train` call that returned `history` reached `args.steps` rather than stopping
    at `args.time_limit` (no rows: it resumed from a checkpoint of the last step)."""
    return not history or history[-1]["step"] == args.steps


def _out_of_time(limit: float | None, began: float, dist: Dist, device: torch.device) -> bool:
    """Whether `limit` seconds have passed since `began` on any rank: the ranks stop together."""
    if limit is None:
        return False
    late = time.perf_counter() - began > limit
    if not dist.enabled:
        return late
    return dist.all_reduce_sum(torch.tensor([float(late)], device=device)).item() > 0


@contextlib.contextmanager
def _compiled_layers(model: nn.Module):
    """Each decoder layer compiled in place (`nn.Module.compile`) for the duration. That has no
    public inverse: on the way out the attribute it sets goes back to what it was."""
    layers = decoder_layers(model)[1]
    before = [layer._compiled_call_impl for layer in layers]
    for layer in layers:
        layer.compile()
    try:
        yield
    finally:
        for layer, impl in zip(layers, before):
            layer._compiled_call_impl = impl


def _as_json(value):
    """`value` as it reads back from a checkpoint's JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _losses(out, teacher: nn.Module, ids: torch.Tensor, args: TrainArgs,
            layer_outputs: tuple[LayerOutputs, LayerOutputs] | None, lm_kl=lm_and_kl) -> tuple[torch.Tensor, ...]:
    """The LM cross-entropy, KL and hidden-state terms of the student's output `out` (computed
    without labels when `args.distill` > 0: the cross-entropy then comes from the KL's
    log-softmax) against one teacher forward on `ids` (`layer_outputs`: the student's and the
    teacher's, when that term is on); a term whose weight in `args` is 0 is 0, uncomputed."""
    zero = torch.zeros((), device=ids.device)
    if not args.distills:
        return out.loss.float(), zero, zero
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False)
    loss, kd = lm_kl(out.logits, target.logits, ids) if args.distill > 0 else (out.loss.float(), zero)
    mse = hidden_mse(layer_outputs[0].pop(), layer_outputs[1].pop()) if layer_outputs is not None else zero
    return loss, kd, mse


def _log_row(step, tokens, lr, lam, sums, penalty, dist, seconds) -> dict:
    zeros, entries = penalty.pop_sparsity()
    reduced = dist.all_reduce_sum(torch.cat([sums, zeros, entries]))
    loss_sum, kd_sum, hidden_sum, l1_sum, count = reduced[:5].tolist()
    layers = penalty.layers
    zeros, entries = reduced[5 : 5 + layers], reduced[5 + layers :]
    row = {"step": step, "tokens": tokens, "lr": lr, "lambda": lam, "loss": loss_sum / count, "kd": kd_sum / count,
           "hidden": hidden_sum / count, "l1": l1_sum / count, "sparsity": (zeros.sum() / entries.sum()).item()}
    row.update({f"sparsity_{i}": v for i, v in enumerate((zeros / entries).tolist())})
    row["seconds"] = round(seconds, 3)
    return row
