"""actsparse: activation sparsity for Hugging Face gated-MLP decoders.

Importing it registers the `actsparse` quantization method with transformers, so that
`from_pretrained` loads a saved directory sparse; the other public names load on first use
(PEP 562). The console script (`actsparse_cli`) handles Ctrl-C before this import runs."""
from __future__ import annotations

import importlib
from typing import Any

from . import hf_quantizer  # noqa: F401  (registers the quantizer with transformers)

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
    "RSparseKlConfig": "config",
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
