"""Output directories written atomically, and never over a user's files without being told.

`check_output` runs before any slow work: it refuses an output that is a file, a non-empty
directory (unless overwriting), or a place that cannot be written, and removes what killed
runs left beside it. `atomic_output` writes into `.NAME.tmp-PID` beside the output; only when
that is complete is an old output renamed aside (`.NAME.old-PID`), the new one renamed in and the
old one removed, so at every moment NAME is either the old output or the new one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import ActSparseError

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def check_output(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Path:
    """`path` if a new output can be written there; cleans up leftovers of killed runs first."""
    path = Path(path)
    remove_leftovers(path)
    if path.exists() and not path.is_dir():
        raise ActSparseError(f"{path}: exists and is not a directory (choose another {what})")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ActSparseError(f"{path}: exists and is not empty (choose another {what} or pass --overwrite)")
    parent = _existing_ancestor(path.absolute().parent)
    if not parent.is_dir():
        raise ActSparseError(f"{path}: cannot be created ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ActSparseError(f"{path}: cannot be written ({parent} is not writable)")
    return path


def check_file_output(path: str | os.PathLike, what: str) -> Path:
    """`path` if a file can be written there (it may replace an existing file, not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise ActSparseError(f"{what} {path}: is a directory; give a file name")
    parent = _existing_ancestor(path.absolute().parent)
    if not parent.is_dir():
        raise ActSparseError(f"{what} {path}: cannot be created ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ActSparseError(f"{what} {path}: cannot be written (no permission)")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path`; when the block ends without an error it
    becomes `path` (replacing an old output only with `overwrite`), otherwise it is removed."""
    path = check_output(path, overwrite)
    tmp = _sibling(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if path.exists():
            old = _sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`data` as JSON at `path`, written beside it and renamed in: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(path: str | os.PathLike) -> None:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` beside `path` whose process is gone; an old output
    renamed aside by a run killed before it renamed the new one in goes back to `path`."""
    path = Path(path)
    parent = path.absolute().parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if not m or m["name"] != path.name or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not path.exists():
            os.replace(entry, path)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
