"""The `actsparse` command: a thin layer that parses arguments and calls the library.

Every module in `actsparse.commands` adds one subcommand. Progress goes to stderr, tables for
people to stdout, JSON for machines to the file named by --json. Bad input ends with one line on
stderr and exit status 2 (`--debug` or ACTSPARSE_DEBUG=1 shows the traceback); Ctrl-C with exit
status 130. Nothing heavy is imported before the handlers are in place.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import struct
import sys

from .errors import ActSparseError

DEBUG_ENV = "ACTSPARSE_DEBUG"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line like every other error, rather than the usage text first."""

    def error(self, message: str):
        raise ActSparseError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = _Parser(prog="actsparse", description="Activation sparsity for Hugging Face decoders.")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ActSparseError as e:
        if debug:
            raise
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("actsparse: interrupted", file=sys.stderr)
        return 130
    except _library_errors() as e:
        if debug:
            raise
        _error(_describe(e))
        return 2


def _error(message: str) -> None:
    print(f"actsparse: error: {' '.join(message.split())}", file=sys.stderr)


def _library_errors() -> tuple[type[BaseException], ...]:
    """Errors of the libraries underneath that bad input causes (the last net: commands check
    their inputs before this)."""
    errors: list[type[BaseException]] = [OSError, UnicodeError, json.JSONDecodeError, struct.error, EOFError]
    safetensors = sys.modules.get("safetensors")
    if safetensors is not None:
        errors.append(safetensors.SafetensorError)
    return tuple(errors)


def _describe(e: BaseException) -> str:
    """One line naming the file (when the error knows it) and what went wrong."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else 'failed'} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
