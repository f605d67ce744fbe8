"""Training checkpoints: model weights, optimizer and LR-schedule state, RNG states and the step
reached, as safetensors and JSON only (no pickle).

One directory per checkpoint, `checkpoints/step-NNNNNN/`, written by rank 0 through
`outputs.atomic_output`, so an interrupted save leaves the previous checkpoint as it was.
`trainer.safetensors` holds every tensor of the optimizer and scheduler state and the RNG states,
flattened; `trainer.json` the rest of that state, with each tensor replaced by its key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..errors import ActSparseError
from ..files import check_safetensors, read_json
from ..outputs import atomic_output

MODEL_FILE = "model.safetensors"
STATE_TENSORS = "trainer.safetensors"
STATE_JSON = "trainer.json"
META_FILE = "checkpoint.json"


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, step: int, meta: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_states()}
    flat = _flatten(state, "", tensors)
    with atomic_output(directory, overwrite=True) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(flat))
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=1))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the latest one under an output directory's `checkpoints/`."""
    path = Path(path)
    if not path.exists():
        raise ActSparseError(f"{path}: no such file or directory")
    if (path / META_FILE).is_file():
        return path
    found = sorted((path / "checkpoints").glob("step-*")) if path.is_dir() else []
    found = [p for p in found if (p / META_FILE).is_file()]
    if not found:
        raise ActSparseError(f"{path}: no checkpoint (expected a step-NNNNNN directory or an output directory holding checkpoints/)")
    return found[-1]


def read_meta(directory: Path) -> dict[str, Any]:
    """`checkpoint.json` of a complete checkpoint, after checking its files are readable."""
    meta = read_json(directory / META_FILE)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool) or meta["step"] < 0:
        raise ActSparseError(f"{directory / META_FILE}: expected a JSON object with a \"step\" count")
    for name in (MODEL_FILE, STATE_TENSORS):
        check_safetensors(directory / name)
    if not isinstance(read_json(directory / STATE_JSON), dict):
        raise ActSparseError(f"{directory / STATE_JSON}: expected a JSON object")
    return meta


def load_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler) -> int:
    """Restore model, optimizer, scheduler and RNG states in place; returns the number of steps done."""
    step = read_meta(directory)["step"]
    device = next(model.parameters()).device
    try:
        load_model(model, str(directory / MODEL_FILE), device=str(device))
        tensors = load_file(str(directory / STATE_TENSORS), device=str(device))
        state = _unflatten(read_json(directory / STATE_JSON), tensors)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_states(state["rng"])
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, SafetensorError) as e:
        raise ActSparseError(f"{directory}: checkpoint does not fit this model and optimizer "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return step


def _rng_states() -> dict[str, Any]:
    cuda = [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, each tensor moved into `tensors` under its path and replaced by a marker;
    dicts with non-string keys (the optimizer's parameter indices) and tuples are marked too."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _flatten(v, f"{key}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {key}")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {k: _unflatten(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value
