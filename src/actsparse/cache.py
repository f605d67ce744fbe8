"""Where actsparse keeps what it builds once per machine (compiled CPU kernels, converted GGUF
models): ``$ACTSPARSE_CACHE``, else ``$XDG_CACHE_HOME/actsparse`` or ``~/.cache/actsparse``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("ACTSPARSE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actsparse")


def is_private(path: Path) -> bool:
    """Owned by this user and writable by nobody else."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022
