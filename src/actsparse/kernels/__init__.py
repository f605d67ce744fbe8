"""Backends that run `SparseLinear` / `SparseGatedMLP` faster than the torch reference.

A backend registers an object with two callables:
  linear(module: SparseLinear, x) -> y            same function as the reference forward
  gated_mlp(module: SparseGatedMLP, x) -> y       same function as the reference forward
Select one per model with `actsparse.kernels.set_backend(model, name)`. The "torch" reference
lives in `actsparse.nn` itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ActSparseError


@dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable
    gated_mlp: Callable
    prepare: Callable | None = None  # prepare(model): pack weights etc. once, before use


BACKENDS: dict[str, Backend] = {}
# Backends shipped with actsparse, imported on first use (Triton is an optional dependency).
BUILTIN = {"triton": "actsparse.kernels.triton_backend", "cpu": "actsparse.kernels.cpu_backend"}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    if name not in BACKENDS and name in BUILTIN:
        import importlib

        try:
            importlib.import_module(BUILTIN[name])
        except ModuleNotFoundError as e:
            raise ActSparseError(f"backend {name!r} needs the {e.name!r} package (pip install 'actsparse[gpu]')") from None
    if name not in BACKENDS:
        available = sorted(set(BACKENDS) | set(BUILTIN))
        raise ActSparseError(f"unknown backend {name!r}; available: torch, {', '.join(available)}")
    return BACKENDS[name]


def set_backend(model, name: str) -> None:
    """Run every actsparse module of `model` through backend `name` ("torch" is the reference)."""
    from ..nn import SparseGatedMLP, SparseLinear

    if name != "torch":
        backend = get_backend(name)
        if backend.prepare is not None:
            backend.prepare(model)
    for module in model.modules():
        if isinstance(module, (SparseLinear, SparseGatedMLP)):
            module.backend = name
