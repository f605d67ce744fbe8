"""A converted copy of each GGUF model loaded in fp32, so that only its first load pays for the
conversion.

transformers reads a GGUF file's metadata three times (config, tokenizer, weights) in pure Python
and dequantizes every tensor: 30-64 s for the 98 MB embedded SmolLM2 on 2 cores, at every load.
The first fp32 load stores what it made as a Hugging Face model directory (config, safetensors
weights, tokenizer) in ``$ACTSPARSE_GGUF_CACHE`` (default ``cache_root()/gguf``), named by a hash
of the file's bytes and the transformers version; later loads, in any dtype, read that directory.
Copies over `MAX_BYTES` are not kept (an 8B GGUF would take 32 GB in fp32), and a file that is
itself larger is not even hashed. ``ACTSPARSE_GGUF_CACHE=off`` turns the cache off. Processes
that load the same file at once (the ranks of a torchrun job, test workers) convert it once: the
others wait for its copy (`converting`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from .cache import cache_root, is_private

MAX_BYTES = 2 * 2**30
OFF = ("0", "off", "false", "no")


def cache_dir() -> Path | None:
    """The folder of the converted copies, None when the cache is off."""
    setting = os.environ.get("ACTSPARSE_GGUF_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    return Path(setting) if setting else cache_root() / "gguf"


def slot(gguf: Path) -> Path | None:
    """Where the converted copy of `gguf` is (or would be) kept; None when the cache is off or
    the file is too large for its fp32 copy ever to be kept."""
    folder = cache_dir()
    if folder is None or gguf.stat().st_size > MAX_BYTES:
        return None
    import transformers

    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    digest.update(transformers.__version__.encode())
    return folder / digest.hexdigest()[:20]


def holds_copy(path: Path | None) -> bool:
    """Whether the slot `path` holds a converted copy, usable or not."""
    return path is not None and (path / "config.json").is_file()


def ready(path: Path | None) -> bool:
    """Whether the slot `path` holds a copy to load. A copy that someone else could have written
    is not used."""
    if not holds_copy(path):
        return False
    if not (is_private(path.parent) and is_private(path)):
        print(f"actsparse: not using the converted copy {path}: its folder is not private to you "
              "(fix its permissions or set ACTSPARSE_GGUF_CACHE); converting the GGUF file again",
              file=sys.stderr, flush=True)
        return False
    return True


@contextlib.contextmanager
def converting(path: Path | None, name: str):
    """Held by the one process that converts the GGUF file `name` for the slot `path` (None: no
    lock); another process that loads the same file meanwhile waits here, then finds the copy."""
    if path is None:
        yield
        return
    lock = FileLock(f"{path}.lock")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"actsparse: waiting for another process converting {name} into {path}", file=sys.stderr, flush=True)
            lock.acquire()
    except OSError:  # no folder to lock in: `store` says why when it cannot keep the copy either
        yield
        return
    try:
        yield
    finally:
        lock.release()


def store(path: Path | None, model: torch.nn.Module, tokenizer, name: str) -> None:
    """Keep `model` (just loaded in fp32 from the GGUF file `name`) and its tokenizer in the slot
    `path`: written in a temporary folder, then renamed, so no half-written copy is ever read. A
    failure to write is reported and changes nothing else."""
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
        print(f"actsparse: could not keep a converted copy of {name} in {path.parent} ({e}); "
              "the next load converts it again (set ACTSPARSE_GGUF_CACHE to a writable folder, or off)",
              file=sys.stderr, flush=True)
