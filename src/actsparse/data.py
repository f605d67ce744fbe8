"""Text sources (plain text, JSONL, gzipped JSONL, parquet, `datasets`) and token windows."""
from __future__ import annotations

import gzip
import json
import sys
import zlib
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import ActSparseError
from .files import decode_utf8, read_text

TEXT_SUFFIXES = (".txt", ".raw", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


BUILTIN_TEXTS = ("python-docs:calibration", "python-docs:evaluation")


def read_texts(source: Any, field: str = "text") -> list[str]:
    """Documents from a path (.txt/.raw: the whole file is one text; .jsonl[.gz]/.parquet: the
    `field` of each record), a `datasets.Dataset`, a list of strings, or a built-in text.

    The built-in texts are the Python language reference that ships with every Python
    (`pydoc_data.topics`), split by topic into disjoint calibration and evaluation halves, so the
    demo runs offline with nothing but the installed packages."""
    if isinstance(source, (list, tuple)):
        texts = [str(t) for t in source]
    elif isinstance(source, str) and source in BUILTIN_TEXTS:
        texts = _python_docs(source.endswith("evaluation"))
    elif isinstance(source, (str, Path)):
        texts = _read_path(Path(source), field)
    elif hasattr(source, "column_names"):  # a datasets.Dataset
        if field not in source.column_names:
            raise ActSparseError(f"dataset has no column {field!r}; columns: {', '.join(source.column_names)}")
        texts = list(source[field])
    else:
        raise ActSparseError(f"cannot read text from a {type(source).__name__}")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ActSparseError(f"{_describe(source)} holds no text")
    return texts


def _python_docs(evaluation: bool) -> list[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    return [topics[n] for i, n in enumerate(names) if i % 2 == int(evaluation)]


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the given text"


def _read_path(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise ActSparseError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        texts = []
        for lineno, line in enumerate(_read_jsonl_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ActSparseError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise ActSparseError(f"{path}:{lineno}: record has no {field!r} field")
            texts.append(str(record[field]))
        return texts
    if name.endswith(".parquet"):
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pyarrow.ArrowException, OSError) as e:
            raise ActSparseError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if field not in table.column_names:
            raise ActSparseError(f"{path}: no column {field!r}; columns: {', '.join(table.column_names)}")
        return [str(t) for t in table.column(field).to_pylist()]
    if name.endswith(TEXT_SUFFIXES) or "." not in name:
        return [read_text(path)]
    raise ActSparseError(
        f"{path}: unknown text format; use .txt/.raw (plain text), .jsonl/.jsonl.gz ({{\"{field}\": ...}} per line) or .parquet"
    )


def _read_jsonl_text(path: Path) -> str:
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ActSparseError(f"{path}: cannot read ({e})") from None
    return decode_utf8(data, path)


def wants_bos(tokenizer) -> bool:
    """Whether the model expects a BOS token at the start of every sequence (e.g. Gemma)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("hello").input_ids
    return len(ids) > 0 and ids[0] == bos


def tokenize_texts(tokenizer, texts: Iterable[str], max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the documents joined by blank lines, without special tokens.

    Stops reading documents once `max_tokens` are reached (calibration needs only a few)."""
    ids: list[int] = []
    for i, text in enumerate(texts):
        piece = text if i == 0 else "\n\n" + text
        ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def token_windows(ids: torch.Tensor, seq_len: int, n: int | None, bos: int | None, what: str) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len]; with `bos`, each window is BOS + seq_len-1 tokens."""
    if seq_len < 2:
        raise ActSparseError(f"sequence length must be at least 2, got {seq_len}")
    body = seq_len - 1 if bos is not None else seq_len
    available = ids.numel() // body
    if available == 0:
        raise ActSparseError(
            f"{what} has {ids.numel()} tokens, shorter than one window of {seq_len}; give more text or a shorter --seq-len"
        )
    if n is None:
        n = available
    elif n > available:
        print(f"actsparse: {what} holds only {available} windows of {seq_len} tokens; using {available}, not {n}", file=sys.stderr)
        n = available
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def text_batches(tokenizer, source: Any, n: int = 16, seq_len: int = 512, field: str = "text") -> torch.Tensor:
    """Calibration windows [n, seq_len] from any text source `read_texts` accepts."""
    texts = read_texts(source, field)
    bos = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    ids = tokenize_texts(tokenizer, texts, max_tokens=n * seq_len)
    return token_windows(ids, seq_len, n, bos, what=f"calibration text {_describe(source)}")
