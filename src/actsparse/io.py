"""Save and load sparsified models.

A saved directory holds a plain Hugging Face model (config.json, model.safetensors, tokenizer
files: the possibly transformed weights) and a folder `actsparse/` with `state.safetensors` (every
tensor of sparsity state: thresholds, scales, low-rank factors, rotations) and `recipe.json`
(format version, method config, the method's recipe, and the structure of each actsparse module).
The state lives in a subfolder so that loaders which read every top-level `*.safetensors` as
weights (vLLM) do not take it for weights. config.json's `quantization_config` names the method
and the state, so that `from_pretrained` loads the model sparse (see `hf_quantizer`), and its
`model_type` is actsparse's, so that transformers without actsparse refuses it. Writes go to
a temporary directory renamed into place, so a failed save leaves nothing behind.

Directories of format version 1 (`actsparse.json` and `actsparse.safetensors` at the top level)
still load through `load`.
"""
from __future__ import annotations

import contextlib
import contextvars
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
from .rotation import RotatedNorm, restore_rotated_norm
from .swap import swap_modules

FORMAT_VERSION = 2
STATE_DIR = "actsparse"
META_FILE = f"{STATE_DIR}/recipe.json"
STATE_FILE = f"{STATE_DIR}/state.safetensors"
LEGACY_FORMAT_VERSION = 1  # META_FILE and STATE_FILE at the top level, no quantization_config
LEGACY_META_FILE = "actsparse.json"
LEGACY_STATE_FILE = "actsparse.safetensors"
QUANT_METHOD = "actsparse"
MODEL_TYPE = "actsparse"  # config.json's model_type: transformers without actsparse refuses it by name
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
register_module_kind(RotatedNorm, restore_rotated_norm)


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
        with saving_through_actsparse():
            model.save_pretrained(tmp, state_dict=_hf_state_dict(model, state))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / STATE_DIR).mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / STATE_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "config": config.to_dict(),
            "recipe": getattr(model, "actsparse_recipe", {}),
            "modules": {name: m.spec() for name, m in _state_modules(model).items()},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        _declare_sparse(tmp / "config.json", config.method)
    return Path(directory)


def quantization_config(method: str, base_model_type: str) -> dict:
    """config.json's `quantization_config` of a directory saved by this actsparse."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": method, "state": STATE_FILE,
            "base_model_type": base_model_type}


def _declare_sparse(config_json: Path, method: str) -> None:
    """config.json names actsparse twice: as its quantization method, which makes `from_pretrained`
    load the model sparse once actsparse is imported, and as its model type, which makes
    transformers without actsparse refuse it (an unknown quantization method only logs a warning
    and loads dense). The architecture's own model type moves into the quantization entry."""
    config = json.loads(config_json.read_text())
    config["quantization_config"] = quantization_config(method, config["model_type"])
    config["model_type"] = MODEL_TYPE
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def dense_hf_config(config: dict) -> dict:
    """A saved directory's config.json as the plain architecture's: its own model type, no actsparse
    quantization (what transformers or vLLM load dense)."""
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    quantization = config.get("quantization_config")
    if config.get("model_type") == MODEL_TYPE and isinstance(quantization, dict):
        plain["model_type"] = quantization.get("base_model_type")
    return plain


_saving = contextvars.ContextVar("actsparse_saving", default=False)


@contextlib.contextmanager
def saving_through_actsparse():
    """Marks `save`'s call of `save_pretrained`, the one way a sparse model loaded by
    `from_pretrained` may be saved (save_pretrained alone cannot write the sparsity state)."""
    token = _saving.set(True)
    try:
        yield
    finally:
        _saving.reset(token)


def is_saving_through_actsparse() -> bool:
    return _saving.get()


def _layout(directory: Path) -> tuple[Path, Path]:
    """(recipe file, state file) of a saved directory: the current layout, else format version 1's."""
    if not (directory / META_FILE).is_file() and (directory / LEGACY_META_FILE).is_file():
        return directory / LEGACY_META_FILE, directory / LEGACY_STATE_FILE
    return directory / META_FILE, directory / STATE_FILE


def read_meta(directory: str | os.PathLike) -> dict:
    """The contents of `actsparse/recipe.json` (or a version 1 directory's `actsparse.json`), after
    checking that `directory` is a complete actsparse directory of a supported format version;
    reads no weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ActSparseError(f"{directory}: no such directory")
    meta_file, state_file = _layout(directory)
    for required in (directory / "config.json", meta_file, state_file):
        if not required.is_file():
            raise ActSparseError(f"{required}: missing; not a complete actsparse directory")
    if not any(directory.glob("model*.safetensors")):
        raise ActSparseError(f"{directory / 'model.safetensors'}: missing; not a complete actsparse directory")
    meta = read_json(meta_file)
    if not isinstance(meta, dict):
        raise ActSparseError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")
    expected = LEGACY_FORMAT_VERSION if meta_file.name == LEGACY_META_FILE else FORMAT_VERSION
    if meta.get("format_version") != expected:
        raise ActSparseError(
            f"{meta_file}: format version {meta.get('format_version')!r} is not supported "
            f"(this actsparse reads version {expected} in this layout)"
        )
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise ActSparseError(f"{meta_file}: {key!r} missing or not a JSON {kind.__name__.replace('dict', 'object')}")
    if meta["dtype"] not in SAVED_DTYPES:
        raise ActSparseError(f"{meta_file}: dtype {meta['dtype']!r} is not one of {', '.join(SAVED_DTYPES)}")
    for name, spec in meta["modules"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or spec["kind"] not in MODULE_KINDS:
            kind = spec.get("kind") if isinstance(spec, dict) else spec
            raise ActSparseError(f"{meta_file}: unknown module kind {kind!r} for {name} "
                                 f"(known: {', '.join(sorted(MODULE_KINDS))})")
    try:
        config_from_dict(meta["config"])
    except ActSparseError as e:
        raise ActSparseError(f"{meta_file}: {e}") from None
    check_json_files(directory)
    check_hf_config(directory)
    for path in [state_file, *sorted(directory.glob("model*.safetensors"))]:
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
    dtype = SAVED_DTYPES[meta["dtype"]]
    try:
        # the quantizer (hf_quantizer) restores the sparsity state; a version 1 directory has no
        # quantization_config, so loads dense and is restored here
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise ActSparseError(f"{directory / 'model.safetensors'}: does not match config.json ({str(e).splitlines()[0]})") from None
    if getattr(model, "actsparse_config", None) is None:
        restore_sparse_(model, directory, meta)
    return model, saved_tokenizer(directory)


def restore_sparse_(model: nn.Module, directory: Path, meta: dict) -> None:
    """Turn a freshly loaded dense model of a saved directory into the saved sparse model: swap its
    modules, rebuild each saved module's structure, load the sparsity state."""
    config = config_from_dict(meta["config"])
    meta_file, state_file = _layout(directory)
    swap_modules(model)
    for name, spec in meta["modules"].items():
        try:
            MODULE_KINDS[spec["kind"]][1](model, name, spec)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError) as e:
            raise ActSparseError(f"{meta_file}: module {name!r} does not fit the model ({type(e).__name__}: {e})") from None
    _load_state(model, state_file, meta_file.name)
    model.actsparse_config = config
    model.actsparse_recipe = meta.get("recipe", {})


def _load_state(model: nn.Module, path: Path, meta_name: str) -> None:
    tensors = load_file(str(path))
    expected = _state_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ActSparseError(f"{path}: tensors do not match {meta_name} (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for key, value in tensors.items():
        target = expected[key]
        if target.shape != value.shape:
            raise ActSparseError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        module_name, _, buf_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, buf_name, value.to(device=target.device, dtype=target.dtype))
