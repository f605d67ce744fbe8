"""Method handlers, keyed by config type: ``sparsify_(model, config, calibration)``.

A handler turns calibration statistics into per-module state on the swapped modules. Each method
lives in its own module and registers itself with `register`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import MethodConfig
from ..errors import ActSparseError
from ..heap import retain_freed_blocks
from ..models import LayerSpec
from ..swap import swap_modules

Handler = Callable[[nn.Module, list[LayerSpec], MethodConfig, "torch.Tensor | None"], dict]
HANDLERS: dict[type, Handler] = {}
NEEDS_CALIBRATION: set[type] = set()


def register(config_cls: type, *, calibrated: bool = True) -> Callable[[Handler], Handler]:
    def wrap(fn: Handler) -> Handler:
        HANDLERS[config_cls] = fn
        if calibrated:
            NEEDS_CALIBRATION.add(config_cls)
        return fn

    return wrap


def sparsify_(model: nn.Module, config: MethodConfig, calibration: torch.Tensor | None = None) -> nn.Module:
    """Make `model` sparse in place with `config`; `calibration` is token ids [n, seq_len].

    The config and whatever the method decided (allocations, search results) are kept on the
    model as `actsparse_config` / `actsparse_recipe`, so that `actsparse.save` writes them."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise ActSparseError(f"no handler for {type(config).__name__}")
    if getattr(model, "actsparse_config", None) is not None:
        raise ActSparseError(
            f"model is already sparsified with {model.actsparse_config.method}; start from the dense model"
        )
    if type(config) in NEEDS_CALIBRATION and config.sparsity > 0 and calibration is None:
        raise ActSparseError(f"method {config.method} needs calibration text")
    specs = swap_modules(model)
    was_training = model.training
    model.eval()
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    with retain_freed_blocks(on_cpu):
        recipe = handler(model, specs, config, calibration)
    model.train(was_training)
    model.actsparse_config = config
    model.actsparse_recipe = recipe or {}
    return model


# Importing the method modules registers them.
from . import dense, magnitude, cats, prosparse  # noqa: E402,F401
from . import rsparse, larosa, rsparse_kl  # noqa: E402,F401
