"""Options and helpers shared by several subcommands."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import config_fields, parse_option
from ..errors import ActSparseError
from ..runtime import BACKENDS

DEFAULT_CALIB = "python-docs:calibration"
DEFAULT_EVAL = "python-docs:evaluation"


def add_model(p: argparse.ArgumentParser, what: str = "model") -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help=f"{what}: a local HF directory, a .gguf file, an actsparse output directory or a hub id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="where the sparse modules run: auto (the kernels where the device and dtype have them: "
                        "CUDA, or float32 on the CPU; else the torch reference), kernels, or torch (the reference)")


def add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=DEFAULT_CALIB, metavar="FILE",
                   help="calibration text: .txt/.raw, .jsonl[.gz] ({\"text\": ...}) or .parquet "
                        f"(default: {DEFAULT_CALIB}, the Python reference shipped with Python)")
    p.add_argument("--calib-samples", type=int, default=16, metavar="N", help="calibration windows (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=512, metavar="L", help="calibration window length (default 512)")


def add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selection", default=None, help="threshold or topk (default: the method's)")
    p.add_argument("--allocation", default=None, help="uniform or greedy, for methods that allocate per linear")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other field of the method's config, e.g. --option alpha=0.8 (repeatable)")


def method_fields(args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """--selection, --allocation and each --option KEY=VALUE, parsed against the type of the config
    field KEY of the first of `methods` that has it (make_config then refuses a method without it)."""
    fields: dict[str, Any] = {}
    if args.selection is not None:
        fields["selection"] = args.selection
    if args.allocation is not None:
        fields["allocation"] = args.allocation
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ActSparseError(f"--option {item!r}: expected KEY=VALUE")
        owner = next((m for m in methods if key in config_fields(m)), methods[0] if methods else "")
        fields[key] = parse_option(owner, key, value)
    return fields


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ActSparseError(f"{name} must be at least 1, got {value}")


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ActSparseError(f"{what}: empty list")
    return items


def parse_sparsities(text: str) -> list[float]:
    values = []
    for item in parse_list(text, "--sparsity"):
        try:
            value = float(item)
        except ValueError:
            raise ActSparseError(f"--sparsity {item!r} is not a number") from None
        if not 0.0 <= value < 1.0:
            raise ActSparseError(f"--sparsity must be in [0, 1), got {value}")
        values.append(value)
    return values


def parse_stages(text: str) -> tuple[tuple[float, float], ...]:
    """ProSparse stage table from "END:LAMBDA,END:LAMBDA,...", ends in any step unit (scaled to
    the run's steps); ProSparseConfig checks the table itself."""
    stages = []
    for item in parse_list(text, "--stages"):
        end, sep, lam = item.partition(":")
        try:
            stages.append((float(end), float(lam if sep else "")))
        except ValueError:
            raise ActSparseError(f"--stages: {item!r} is not END:LAMBDA (e.g. 0.3:0,0.4:0.01,1:0.2)") from None
    return tuple(stages)


def log(message: str) -> None:
    print(f"actsparse: {message}", file=sys.stderr, flush=True)
