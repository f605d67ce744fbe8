"""The `actsparse` command: a thin layer that parses arguments and calls the library.

Every module in `actsparse.commands` adds one subcommand. Progress goes to stderr, tables for
people to stdout, JSON for machines to the file named by --json. Bad input ends with one line on
stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .errors import ActSparseError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actsparse", description="Activation sparsity for Hugging Face decoders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ActSparseError as e:
        print(f"actsparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actsparse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
