"""actsparse sparsify [MODEL] --method M --sparsity S [--calib FILE] [--allocation uniform|greedy] [--student FILE] -o DIR"""
from __future__ import annotations

import time
from pathlib import Path

from ..config import make_config
from ..data import read_texts, text_batches
from ..errors import ActSparseError
from ..io import save
from ..loading import load_model, parse_dtype
from ..methods import sparsify_
from ..outputs import check_output
from ..train.student import student_config, student_model
from ._common import add_calibration, add_method_options, add_model, check_positive, log, method_fields


def register(sub) -> None:
    p = sub.add_parser("sparsify", help="calibrate and sparsify a model, then save it")
    add_model(p)
    p.add_argument("--method", required=True, help="dense, teal, cats, wina, rsparse, rsparse-kl, larosa, prosparse")
    p.add_argument("--sparsity", type=float, required=True,
                   help="target: model-level weight reads skipped (teal, wina, rsparse, rsparse-kl, larosa) or MLP zeros (cats, prosparse)")
    add_calibration(p)
    add_method_options(p)
    p.add_argument("--student", metavar="FILE",
                   help="prosparse: trained weights exported by a training run (benchmarks/prosparse_gpu.py --export) "
                        "for MODEL, the original model they were trained from")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    fields = dict(sparsity=args.sparsity, **method_fields(args, [args.method]))
    config = make_config(args.method, **fields)  # validates before the slow model load
    check_positive("--calib-samples", args.calib_samples)
    if args.student is not None and config.method != "prosparse":
        raise ActSparseError(f"--student holds ProSparse weights: use it with --method prosparse, not {config.method}")
    if args.student is not None and not Path(args.student).is_file():
        raise ActSparseError(f"--student {args.student}: no such file")
    if args.student is not None:
        config = student_config(args.student, config)  # a conflicting train_threshold fails before the model loads
    texts = read_texts(args.calib)  # a bad file fails before the model loads
    check_output(args.output, args.overwrite)
    model, tokenizer = load_model(args.model, parse_dtype(args.dtype), args.device)
    calibration = text_batches(tokenizer, texts, args.calib_samples, args.calib_seq_len)
    start = time.perf_counter()
    if args.student is not None:
        student_model(model, args.student, config)
    else:
        sparsify_(model, config, calibration)
    log(f"{config.method} at {config.sparsity:g} ready in {time.perf_counter() - start:.1f} s")
    save(model, args.output, tokenizer, overwrite=args.overwrite)
    log(f"saved to {args.output}")
    return 0
