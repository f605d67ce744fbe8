"""Training checkpoints: model weights, optimizer and LR-schedule state, and the step reached.

One directory per checkpoint, `checkpoints/step-NNNNNN/`, written by rank 0 into a temporary
directory and renamed into place, so an interrupted save leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ..errors import ActSparseError

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer.pt"
META_FILE = "checkpoint.json"


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, step: int, meta: dict[str, Any]) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / MODEL_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=1))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the latest one under an output directory's `checkpoints/`."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    found = sorted((path / "checkpoints").glob("step-*")) if path.is_dir() else []
    found = [p for p in found if (p / META_FILE).is_file()]
    if not found:
        raise ActSparseError(f"{path}: no checkpoint (expected a step-NNNNNN directory or an output directory holding checkpoints/)")
    return found[-1]


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / META_FILE).read_text())


def load_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler) -> int:
    """Restore model, optimizer and scheduler in place; returns the number of steps done."""
    device = next(model.parameters()).device
    load_model(model, str(directory / MODEL_FILE), device=str(device))
    state = torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(read_meta(directory)["step"])
