"""A ProSparse student as one weights file, so that training can outlive the machine it ran on.

`export_student` writes the trained weights (bf16, under the original model's parameter names, tied
weights once: 270 MB for SmolLM2-135M) and the FATReLU threshold they were trained under (the
file's metadata); `load_student` puts them into a fresh copy of the original
model, ReLU-fied, to train on (the original stays the teacher); `student_model` makes that copy a
sparsified ProSparse model that `actsparse.save` writes and `eval`/`bench`/`generate` read.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ProSparseConfig
from ..errors import ActSparseError
from ..methods import sparsify_
from ..methods.prosparse import relufy_


TRAIN_THRESHOLD_KEY = "actsparse.train_threshold"


def export_student(model: nn.Module, base: nn.Module, path: str | os.PathLike, train_threshold: float = 0.0) -> Path:
    """Write `model`'s weights that `base` (the original model) also has, in bf16, with the FATReLU
    threshold it was trained under (0: plain ReLU); a failed write leaves no file behind."""
    names = set(base.state_dict())
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        if name in names and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().to(torch.bfloat16).contiguous()
    path = Path(path)
    partial = path.with_name(f"{path.name}.partial")
    try:
        save_file(state, str(partial), metadata={TRAIN_THRESHOLD_KEY: repr(float(train_threshold))})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_student(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """ReLU-fy `model` (a fresh copy of the original) and load the exported student into it; every
    parameter must come from the file."""
    if getattr(model, "actsparse_config", None) is not None:
        raise ActSparseError(f"model is already sparsified with {model.actsparse_config.method}; load a student into the dense model")
    relufy_(model)
    try:
        state = load_file(str(path), device=str(next(model.parameters()).device))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ActSparseError(f"{path}: not a readable safetensors file ({e})") from None
    missing = sorted({name for name, _ in model.named_parameters()} - set(state))
    try:
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    except RuntimeError as e:  # same names, other shapes: a student of another size
        raise ActSparseError(f"{path}: not a student of this model ({str(e).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise ActSparseError(f"{path}: not a student of this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def trained_threshold(path: str | os.PathLike) -> float | None:
    """The FATReLU threshold the student in `path` was trained under (None: a file exported before
    it was recorded)."""
    try:
        with safe_open(str(path), "pt") as f:
            value = (f.metadata() or {}).get(TRAIN_THRESHOLD_KEY)
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ActSparseError(f"{path}: not a readable safetensors file ({e})") from None
    return None if value is None else float(value)


def student_config(path: str | os.PathLike, config: ProSparseConfig) -> ProSparseConfig:
    """`config` recording the threshold the student in `path` was trained under, when its file has
    it; a different nonzero `config.train_threshold` is refused."""
    trained = trained_threshold(path)
    if trained is None:
        return config
    if config.train_threshold not in (0.0, trained):
        raise ActSparseError(f"{path} was trained under FATReLU {trained:g}, not train_threshold "
                             f"{config.train_threshold:g}; leave train_threshold out to take the file's")
    return dataclasses.replace(config, train_threshold=trained)


def student_model(model: nn.Module, path: str | os.PathLike, config: ProSparseConfig) -> nn.Module:
    """`model` (a fresh copy of the original) with the student's weights, sparsified with `config`
    (its FATReLU threshold; `student_config` fills in the training one), ready for `actsparse.save`."""
    load_student(model, path)
    sparsify_(model, student_config(path, config))
    model.actsparse_recipe = {**model.actsparse_recipe, "student": Path(path).name}
    return model
