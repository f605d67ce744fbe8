"""actsparse: activation sparsity for Hugging Face gated-MLP decoders.

The public names load on first use (PEP 562), so that `actsparse.cli` starts without importing
torch and a Ctrl-C during start-up ends as one line rather than a traceback."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ActSparseError": "errors",
    "CONFIGS": "config",
    "CatsConfig": "config",
    "DenseConfig": "config",
    "LaRoSAConfig": "config",
    "MethodConfig": "config",
    "ProSparseConfig": "config",
    "RSparseConfig": "config",
    "TealConfig": "config",
    "WinaConfig": "config",
    "config_from_dict": "config",
    "load": "io",
    "make_config": "config",
    "measure_sparsity": "measure",
    "read_texts": "data",
    "save": "io",
    "sparsify_": "methods",
    "text_batches": "data",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'actsparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
