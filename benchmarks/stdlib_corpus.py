"""Python's standard library sources as training text: code and docstrings, offline on any machine.

    python benchmarks/stdlib_corpus.py OUT.jsonl.gz [--root DIR] [--no-tests]

One record {"text", "path"} per .py file below --root (default: this Python's standard library),
in path order, site-packages left out. So is pydoc_data: it holds the language reference that
`python-docs:evaluation` reads, which training must not see. The file is written under a
temporary name and renamed into place; the last stdout line is a JSON summary.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import sysconfig
from pathlib import Path

EXCLUDED = {"site-packages", "pydoc_data", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}


def sources(root: Path, tests: bool) -> list[Path]:
    skip = EXCLUDED if tests else EXCLUDED | TEST_DIRS
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts[:-1]))


def write_corpus(root: Path, out: Path, tests: bool = True) -> dict:
    files = sources(root, tests)
    if not files:
        raise SystemExit(f"stdlib_corpus.py: {root}: no .py files to read")
    partial = out.with_name(f".{out.name}.partial")
    chars = 0
    try:
        with gzip.open(partial, "wt", encoding="utf-8") as f:
            for path in files:
                text = path.read_text(encoding="utf-8", errors="replace")
                chars += len(text)
                f.write(json.dumps({"text": text, "path": str(path.relative_to(root))}) + "\n")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"root": str(root), "out": str(out), "files": len(files), "chars": chars, "bytes": out.stat().st_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output .jsonl.gz")
    p.add_argument("--root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="folder of .py files")
    p.add_argument("--no-tests", dest="tests", action="store_false", help="leave out test folders")
    a = p.parse_args()
    if not a.root.is_dir():
        sys.exit(f"stdlib_corpus.py: --root {a.root}: no such folder")
    if not a.out.parent.is_dir():
        sys.exit(f"stdlib_corpus.py: {a.out}: its folder {a.out.parent} does not exist")
    summary = write_corpus(a.root, a.out, a.tests)
    print(f"{summary['files']} files, {summary['chars'] / 1e6:.1f} M characters -> {a.out} ({summary['bytes'] / 1e6:.1f} MB)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
