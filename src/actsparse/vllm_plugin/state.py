"""The sparsity state of a saved directory, in the form vLLM's layers need it.

vLLM builds its own modules (merged q/k/v and gate/up columns, row-parallel o/down), so the plugin
cannot load actsparse's modules; it reads `actsparse/recipe.json` and `actsparse/state.safetensors`
into one `Selection` per Hugging Face linear (a threshold on ``|x| (* scale)``) and one gate
threshold per MLP. State this form cannot express is refused by name before any weight loads.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ActSparseError
from ..io import STATE_FILE, read_meta

SUPPORTED = "threshold selection: teal, wina, cats, prosparse"


@dataclass(frozen=True)
class Selection:
    """Which input entries a linear keeps: ``|x| (* scale) > threshold`` (scores in fp32)."""

    threshold: float
    scale: torch.Tensor | None  # [in_features], fp32
    target: float  # the configured sparsity (kernel launch configs bin by it)

    def same_as(self, other: "Selection") -> bool:
        if self.threshold != other.threshold or (self.scale is None) != (other.scale is None):
            return False
        return self.scale is None or bool(torch.equal(self.scale, other.scale))


@dataclass(frozen=True)
class GateMask:
    """An MLP's mask on ``|act(gate)|`` (CATS, ProSparse's FATReLU)."""

    threshold: float
    target: float


@dataclass(frozen=True)
class SparseState:
    method: str
    linears: dict[str, Selection]  # Hugging Face module name -> selection; absent: dense
    gates: dict[str, GateMask]  # MLP module name -> gate mask; absent: no mask

    def selection(self, name: str) -> Selection | None:
        return self.linears.get(name)


def _refuse(method: str, name: str, what: str) -> ActSparseError:
    return ActSparseError(f"vLLM cannot serve this {method} directory: {name} has {what}, which the actsparse vLLM "
                          f"plugin does not apply (it applies {SUPPORTED}); serve it with actsparse's own engine")


def read_state(directory: str | os.PathLike) -> SparseState:
    """The state of a directory saved by `actsparse.save`, checked for what the plugin applies."""
    directory = Path(directory)
    meta = read_meta(directory)
    method = meta["config"]["method"]
    unsupported = (  # the method's defining state first: LaRoSA's and R-Sparse's selection is top-K too
        ("a rotation (LaRoSA)", lambda spec: spec["kind"] == "RotatedNorm"),
        ("a low-rank term (R-Sparse)", lambda spec: spec["kind"] == "SparseLinear" and spec["rank"]),
        ("top-K selection", lambda spec: "topk" in (spec.get("mode"), spec.get("gate_mode"))),
    )
    for what, found in unsupported:
        for name, spec in meta["modules"].items():
            if found(spec):
                raise _refuse(method, name, what)
    tensors = load_file(str(directory / STATE_FILE))
    linears, gates = {}, {}
    for name, spec in meta["modules"].items():
        if spec["kind"] == "SparseLinear" and spec["mode"] == "threshold":
            threshold = _scalar(tensors, f"{name}.threshold")
            scale = tensors.get(f"{name}.score_scale") if spec["scale"] else None
            linears[name] = Selection(threshold, None if scale is None else scale.float(), float(spec["target"]))
        elif spec["kind"] == "SparseGatedMLP" and spec["gate_mode"] == "threshold":
            gates[name] = GateMask(_scalar(tensors, f"{name}.gate_threshold"), float(spec["gate_target"]))
    return SparseState(method, linears, gates)


def _scalar(tensors: dict[str, torch.Tensor], key: str) -> float:
    if key not in tensors or tensors[key].numel() != 1:
        raise ActSparseError(f"{STATE_FILE}: {key} missing or not a scalar")
    value = float(tensors[key])
    if math.isnan(value):
        raise ActSparseError(f"{STATE_FILE}: {key} is NaN")
    return value
