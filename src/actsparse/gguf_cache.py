"""A converted copy of each GGUF model loaded in fp32, so that only its first load pays for the
conversion.

transformers reads a GGUF file's metadata three times (config, tokenizer, weights) in pure Python
and dequantizes every tensor: 50-60 s for the 98 MB embedded SmolLM2 on 2 cores, at every load.
The first fp32 load stores what it made as a Hugging Face model directory (config, safetensors
weights, tokenizer) in ``$ACTSPARSE_GGUF_CACHE`` (default ``$ACTSPARSE_CACHE/gguf``, else
``$XDG_CACHE_HOME/actsparse/gguf`` or ``~/.cache/actsparse/gguf``), named by a hash of the file's
bytes and the transformers version; later loads, in any dtype, read that directory. Models whose
fp32 copy would exceed `MAX_BYTES` are not stored (an 8B GGUF would take 32 GB).
``ACTSPARSE_GGUF_CACHE=off`` turns the cache off.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

MAX_BYTES = 2 * 2**30
OFF = ("0", "off", "false", "no")


def cache_dir() -> Path | None:
    """The folder of the converted copies, None when the cache is off."""
    setting = os.environ.get("ACTSPARSE_GGUF_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting)
    root = os.environ.get("ACTSPARSE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actsparse"
    return Path(root) / "gguf"


def entry(gguf: Path) -> Path | None:
    """Where the converted copy of `gguf` is (or would be) kept."""
    folder = cache_dir()
    if folder is None:
        return None
    import transformers

    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    digest.update(transformers.__version__.encode())
    return folder / digest.hexdigest()[:20]


def _private(path: Path) -> bool:
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def lookup(gguf: Path) -> Path | None:
    """The converted copy of `gguf`, None if there is none (or the cache is off). A copy that
    someone else could have written is not used."""
    path = entry(gguf)
    if path is None or not (path / "config.json").is_file():
        return None
    if not (_private(path.parent) and _private(path)):
        print(f"actsparse: not using the converted copy {path}: its folder is not private to you "
              "(fix its permissions or set ACTSPARSE_GGUF_CACHE); converting the GGUF file again",
              file=sys.stderr, flush=True)
        return None
    return path


def store(gguf: Path, model: torch.nn.Module, tokenizer) -> None:
    """Keep `model` (just loaded from `gguf` in fp32) and its tokenizer for later loads: written in
    a temporary folder, then renamed, so no half-written copy is ever read. A failure to write
    is reported and changes nothing else."""
    path = entry(gguf)
    if path is None or path.exists() or sum(p.numel() for p in model.parameters()) * 4 > MAX_BYTES:
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=path.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        if path.exists():  # another process stored it first
            return
        print(f"actsparse: could not keep a converted copy of {gguf.name} in {path.parent} ({e}); "
              "the next load converts it again (set ACTSPARSE_GGUF_CACHE to a writable folder, or off)",
              file=sys.stderr, flush=True)
