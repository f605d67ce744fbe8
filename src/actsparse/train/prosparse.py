"""ProSparse end to end on a loaded model: ReLU swap, L1-scheduled training, FATReLU."""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ..config import ProSparseConfig
from ..errors import ActSparseError
from ..methods import sparsify_
from ..methods.prosparse import relufy_, set_fatrelu
from .distributed import Dist
from .loop import TrainArgs, finished, train
from .schedule import L1Schedule


def train_prosparse(
    model: nn.Module,
    windows: torch.Tensor,
    config: ProSparseConfig,
    args: TrainArgs,
    out_dir: str | os.PathLike,
    *,
    resume: str | os.PathLike | None = None,
    dist: Dist | None = None,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> list[dict]:
    """ReLU-fy `model`, train it with `config`'s L1 schedule (under FATReLU at `config.train_threshold`
    when that is > 0), then install FATReLU at `config.threshold` so that it is a
    sparsified actsparse model (`actsparse.io.save` writes it). With `args.distill` or
    `args.distill_hidden` > 0, `teacher` (the original dense model, put in eval mode) is the frozen
    teacher; by default a copy of `model` as given, before the swap. Pass it to continue training
    a model that is ReLU-fied already (e.g. an earlier run's weights in a `relufy_`-ed copy of the
    original). Returns the logged rows.

    If training stopped at `args.time_limit` (`finished(history, args)` is False), the model is
    left ReLU-fied but not finalised (no FATReLU, not savable): continue with a fresh dense model
    and `resume=out_dir`."""
    if getattr(model, "actsparse_config", None) is not None:
        raise ActSparseError(f"model is already sparsified with {model.actsparse_config.method}; train from the dense model")
    if not args.distills:
        teacher = None
    elif teacher is None:
        teacher = copy.deepcopy(model).requires_grad_(False)
    if teacher is not None:
        teacher.eval()  # its forward runs under no_grad: a teacher passed in keeps its requires_grad
    specs = relufy_(model)
    if config.train_threshold > 0:
        set_fatrelu(specs, config, config.train_threshold)
    schedule = L1Schedule.from_config(config, args.steps)
    history = train(model, windows, schedule, args, out_dir, l1_reduce=config.l1_reduce, resume=resume, dist=dist,
                    meta={"config": config.to_dict()}, progress=progress, teacher=teacher)
    del teacher
    if not finished(history, args):
        return history
    sparsify_(model, config)
    model.actsparse_recipe = {
        **model.actsparse_recipe,
        "training": {
            "steps": args.steps,
            "tokens": history[-1]["tokens"] if history else 0,
            "seq_len": int(windows.shape[1]),
            "world_size": dist.world_size if dist else 1,
            "stages": [list(s) for s in schedule.stages],
            "distill": args.distill,
            "distill_hidden": args.distill_hidden,
            "final": {k: history[-1][k] for k in ("loss", "kd", "hidden", "l1", "lambda", "sparsity")} if history else {},
        },
    }
    return history
