"""actsparse: activation sparsity for Hugging Face gated-MLP decoders."""
from .config import (
    CONFIGS,
    CatsConfig,
    DenseConfig,
    MethodConfig,
    ProSparseConfig,
    TealConfig,
    WinaConfig,
    config_from_dict,
    make_config,
)
from .config import LaRoSAConfig, RSparseConfig  # noqa: F401
from .data import read_texts, text_batches
from .errors import ActSparseError
from .io import load, save
from . import hf_quantizer  # noqa: F401  (registers the `actsparse` quantization method with transformers)
from .measure import measure_sparsity
from .methods import sparsify_

__version__ = "0.1.0"

__all__ = [
    "ActSparseError",
    "CONFIGS",
    "CatsConfig",
    "DenseConfig",
    "MethodConfig",
    "ProSparseConfig",
    "TealConfig",
    "WinaConfig",
    "config_from_dict",
    "load",
    "make_config",
    "measure_sparsity",
    "read_texts",
    "save",
    "sparsify_",
    "text_batches",
]
