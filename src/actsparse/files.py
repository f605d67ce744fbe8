"""Checks that a file the tool reads is what it claims to be, before any slow work: text that
decodes as UTF-8, a safetensors file whose header matches its size, a GGUF file whose header parses
and whose tensors fit in it. Each failure is one ActSparseError naming the file."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import ActSparseError


def read_text(path: str | os.PathLike) -> str:
    """The whole file as UTF-8 text; an undecodable byte is named by its offset."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ActSparseError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_utf8(data, path)


def decode_utf8(data: bytes, path: str | os.PathLike, offset: int = 0) -> str:
    """`data` (read from `path` at byte `offset`) as UTF-8 text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ActSparseError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {offset + e.start}); "
                             "convert it to UTF-8") from None


def read_json(path: str | os.PathLike) -> object:
    """A JSON document from `path`, or an error naming the file and what is wrong with it."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ActSparseError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def check_json_files(directory: str | os.PathLike) -> None:
    """Every `*.json` of a model directory (config, tokenizer, generation config) is a JSON object."""
    for path in sorted(Path(directory).glob("*.json")):
        if not isinstance(read_json(path), dict):
            raise ActSparseError(f"{path}: expected a JSON object")


def check_hf_config(directory: str | os.PathLike) -> None:
    """`config.json` of a model directory is one transformers can build a model config from."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    path = Path(directory) / "config.json"
    try:
        AutoConfig.from_pretrained(directory)
    except (ValueError, TypeError, KeyError, AttributeError, OSError, StrictDataclassError, ActSparseError) as e:
        raise ActSparseError(f"{path}: not a model config transformers can read ({_first_line(e)})") from None


def check_safetensors(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file whose header parses and whose tensors lie inside it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ActSparseError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ActSparseError(f"{path}: not a valid safetensors file ({_first_line(e)}); "
                             "the file is damaged or truncated: save it again") from None


def check_gguf(path: str | os.PathLike) -> None:
    """A file that starts like a GGUF file of a version transformers reads. Parsing the rest takes
    as long as loading it, so a damaged body is reported by `gguf_error` when the load fails."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise ActSparseError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    if len(head) < 24:
        raise ActSparseError(f"{path}: truncated GGUF file ({len(head)} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise ActSparseError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")


GGUF_ERRORS = (ValueError, KeyError, IndexError, OverflowError, EOFError, struct.error)


def gguf_error(path: str | os.PathLike, e: BaseException) -> ActSparseError:
    """The error for a GGUF file that the gguf reader failed on (one of GGUF_ERRORS)."""
    return ActSparseError(f"{path}: not a valid GGUF file ({_first_line(e)}); the file is damaged or truncated")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
