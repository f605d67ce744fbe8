"""Save and load sparsified models.

A saved directory holds a plain Hugging Face model (config.json, model.safetensors, tokenizer
files: the possibly transformed weights), `actsparse.safetensors` (every tensor of sparsity state:
thresholds, scales, low-rank factors, rotations) and `actsparse.json` (format version, method
config, the method's recipe, and the structure of each actsparse module). Writes go to a
temporary directory renamed into place, so a failed save leaves nothing behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import config_from_dict
from .errors import ActSparseError
from .files import check_hf_config, check_json_files, check_safetensors, read_json
from .nn import SparseGatedMLP, SparseLinear
from .outputs import atomic_output
from .swap import swap_modules

FORMAT_VERSION = 1
META_FILE = "actsparse.json"
STATE_FILE = "actsparse.safetensors"
SAVED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
META_KEYS = {"dtype": str, "config": dict, "recipe": dict, "modules": dict}

Restore = Callable[[nn.Module, str, dict], None]
MODULE_KINDS: dict[str, tuple[type, Restore]] = {}


def register_module_kind(cls: type, restore: Restore) -> None:
    """Make `cls` savable: `cls.spec()` describes an instance; `restore(model, name, spec)` rebuilds
    it on a freshly loaded, swapped model before its tensors are loaded. A wrapper module that keeps
    the module it wraps under the attribute named by its class attribute `WRAPS` is saved with the
    wrapped module's parameter names, so that model.safetensors stays a plain HF checkpoint."""
    MODULE_KINDS[cls.__name__] = (cls, restore)


def _restore_in_place(model: nn.Module, name: str, spec: dict) -> None:
    model.get_submodule(name).apply_spec(spec)


register_module_kind(SparseLinear, _restore_in_place)
register_module_kind(SparseGatedMLP, _restore_in_place)


def _state_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds = tuple(cls for cls, _ in MODULE_KINDS.values())
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of actsparse modules: the sparsity state."""
    state = {}
    for name, module in _state_modules(model).items():
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf_name not in module._non_persistent_buffers_set:
                state[f"{name}.{buf_name}"] = buf
    return state


def _hf_state_dict(model: nn.Module, sparsity_state: dict) -> dict[str, torch.Tensor]:
    wrappers = [(n, m.WRAPS) for n, m in _state_modules(model).items() if getattr(m, "WRAPS", None)]
    hf = {}
    for key, value in model.state_dict().items():
        if key in sparsity_state:
            continue
        for name, inner in wrappers:
            if key.startswith(f"{name}.{inner}."):
                key = f"{name}." + key[len(f"{name}.{inner}.") :]
        hf[key] = value
    return hf


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    config = getattr(model, "actsparse_config", None)
    if config is None:
        raise ActSparseError("model was not sparsified by actsparse (use sparsify_ first, DenseConfig for a baseline)")
    with atomic_output(directory, overwrite) as tmp:
        state = _state_tensors(model)
        model.save_pretrained(tmp, state_dict=_hf_state_dict(model, state))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / STATE_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "config": config.to_dict(),
            "recipe": getattr(model, "actsparse_recipe", {}),
            "modules": {name: m.spec() for name, m in _state_modules(model).items()},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return Path(directory)


def read_meta(directory: str | os.PathLike) -> dict:
    """The contents of `actsparse.json`, after checking that `directory` is a complete actsparse
    directory of a supported format version; reads no weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ActSparseError(f"{directory}: no such directory")
    for required in ("config.json", META_FILE, STATE_FILE):
        if not (directory / required).is_file():
            raise ActSparseError(f"{directory / required}: missing; not a complete actsparse directory")
    if not any(directory.glob("model*.safetensors")):
        raise ActSparseError(f"{directory / 'model.safetensors'}: missing; not a complete actsparse directory")
    meta = read_json(directory / META_FILE)
    if not isinstance(meta, dict):
        raise ActSparseError(f"{directory / META_FILE}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ActSparseError(
            f"{directory / META_FILE}: format version {meta.get('format_version')!r} is not supported "
            f"(this actsparse reads version {FORMAT_VERSION})"
        )
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise ActSparseError(f"{directory / META_FILE}: {key!r} missing or not a JSON {kind.__name__.replace('dict', 'object')}")
    if meta["dtype"] not in SAVED_DTYPES:
        raise ActSparseError(f"{directory / META_FILE}: dtype {meta['dtype']!r} is not one of {', '.join(SAVED_DTYPES)}")
    for name, spec in meta["modules"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or spec["kind"] not in MODULE_KINDS:
            kind = spec.get("kind") if isinstance(spec, dict) else spec
            raise ActSparseError(f"{directory / META_FILE}: unknown module kind {kind!r} for {name} "
                                 f"(known: {', '.join(sorted(MODULE_KINDS))})")
    try:
        config_from_dict(meta["config"])
    except ActSparseError as e:
        raise ActSparseError(f"{directory / META_FILE}: {e}") from None
    check_json_files(directory)
    check_hf_config(directory)
    for path in [directory / STATE_FILE, *sorted(directory.glob("model*.safetensors"))]:
        check_safetensors(path)
    return meta


def saved_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved in `directory`, or None when none was saved."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    return AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").is_file() else None


def load(directory: str | os.PathLike, device: str = "cpu"):
    """(model, tokenizer) as saved; tokenizer is None when none was saved."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    meta = read_meta(directory)
    config = config_from_dict(meta["config"])
    dtype = SAVED_DTYPES[meta["dtype"]]
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise ActSparseError(f"{directory / 'model.safetensors'}: does not match config.json ({str(e).splitlines()[0]})") from None
    tokenizer = saved_tokenizer(directory)
    swap_modules(model)
    for name, spec in meta["modules"].items():
        try:
            MODULE_KINDS[spec["kind"]][1](model, name, spec)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError) as e:
            raise ActSparseError(f"{directory / META_FILE}: module {name!r} does not fit the model ({type(e).__name__}: {e})") from None
    _load_state(model, directory / STATE_FILE)
    model.actsparse_config = config
    model.actsparse_recipe = meta.get("recipe", {})
    return model, tokenizer


def _load_state(model: nn.Module, path: Path) -> None:
    tensors = load_file(str(path))
    expected = _state_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ActSparseError(f"{path}: tensors do not match {META_FILE} (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for key, value in tensors.items():
        target = expected[key]
        if target.shape != value.shape:
            raise ActSparseError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        module_name, _, buf_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, buf_name, value.to(device=target.device, dtype=target.dtype))
