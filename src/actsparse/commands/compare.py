"""actsparse compare [MODEL] [--methods teal,cats,wina --sparsity 0.25,0.4,0.5] [--saved DIR,DIR] [--calib FILE] [--ppl FILE] [--backend auto|kernels|torch] --out DIR"""
from __future__ import annotations

import json

from ..compare import check_saved, markdown_table, pareto_plot, ppl_p_summary, run_comparison
from ..config import make_config
from ..data import read_texts, text_batches
from ..errors import ActSparseError
from ..loading import load_model, load_tokenizer, parse_dtype
from ..outputs import atomic_output, check_output
from ..runtime import resolve_backend
from ._common import (DEFAULT_EVAL, add_backend, add_calibration, add_method_options, add_model, check_positive, log,
                      method_fields, parse_list, parse_sparsities)


def register(sub) -> None:
    p = sub.add_parser("compare", help="evaluate methods x sparsities, and saved models, on the same model and text")
    add_model(p)
    add_backend(p)
    p.add_argument("--methods", help="comma-separated, e.g. teal,cats,wina,rsparse,larosa, applied to MODEL")
    p.add_argument("--sparsity", help="comma-separated targets for --methods, e.g. 0.25,0.4,0.5")
    p.add_argument("--saved", metavar="DIR[,DIR...]",
                   help="saved actsparse models (sparsify/train -o), one row each as saved (method, config, dtype), "
                        "labelled by directory; --methods is then optional. A DIR whose tokenizer gives other token "
                        "ids for the --ppl text is refused; one saved without a tokenizer uses MODEL's")
    add_calibration(p)
    add_method_options(p)
    p.add_argument("--ppl", default=DEFAULT_EVAL, metavar="FILE", help=f"perplexity text (default {DEFAULT_EVAL})")
    p.add_argument("--windows", type=int, default=40, metavar="N", help="perplexity windows (default 40)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L")
    p.add_argument("--out", required=True, metavar="DIR", help="writes results.json, results.md, pareto.png")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.methods is None and args.saved is None:
        raise ActSparseError("nothing to compare: give --methods with --sparsity, and/or --saved DIR[,DIR...]")
    if (args.methods is None) != (args.sparsity is None):
        raise ActSparseError("give --methods and --sparsity together")
    methods = parse_list(args.methods, "--methods") if args.methods is not None else []
    sparsities = parse_sparsities(args.sparsity) if args.sparsity is not None else []
    saved = parse_list(args.saved, "--saved") if args.saved is not None else []
    fields = method_fields(args, methods)
    for m in methods:  # fail on a bad name or option before any slow work
        if m != "dense":
            make_config(m, sparsity=sparsities[0], **fields)
    check_positive("--windows", args.windows)
    resolve_backend(args.backend, args.device, parse_dtype(args.dtype))  # a bad pair fails before loading
    out = check_output(args.out, what="--out")
    texts = read_texts(args.calib) if methods else None  # a bad file fails before the model loads
    if args.ppl != "wikitext2":
        read_texts(args.ppl)
    if saved:  # a bad DIR fails before MODEL's weights load
        check_saved(saved, _tokenizer(args.model, load_tokenizer(args.model)), args.ppl, args.seq_len, args.windows)
    model, tokenizer = load_model(args.model, parse_dtype(args.dtype), args.device)
    tokenizer = _tokenizer(args.model, tokenizer)
    param = next(model.parameters())
    kernels = resolve_backend(args.backend, param.device, param.dtype)
    calibration = text_batches(tokenizer, texts, args.calib_samples, args.calib_seq_len) if methods else None
    rows = run_comparison(model, tokenizer, methods, sparsities, calibration, args.ppl, args.seq_len, args.windows,
                          fields, saved, log=log, kernels=kernels)
    table = markdown_table(rows)
    summary = ppl_p_summary(rows)
    calib = f"calibration: {args.calib} ({args.calib_samples}x{args.calib_seq_len}); " if methods else ""
    header = (f"model: {args.model or 'SmolLM2-135M-Instruct (embedded)'}; {calib}perplexity: {args.ppl}, "
              f"{args.windows} windows of {args.seq_len}; every token sparsified")
    with atomic_output(out) as tmp:
        (tmp / "results.json").write_text(json.dumps({"setup": header, "rows": rows, "ppl_5pct_sparsity": summary}, indent=1))
        (tmp / "results.md").write_text(f"{header}\n\n{table}\n\nPPL-5% sparsity (measured): {json.dumps(summary)}\n")
        pareto_plot(rows, tmp / "pareto.png", title="perplexity vs measured sparsity")
    print(header)
    print(table)
    print(json.dumps({"rows": [{k: r[k] for k in ("method", "source", "target", "ppl", "sparsity_model", "sparsity_mlp")} for r in rows]}))
    return 0


def _tokenizer(model, tokenizer):
    if tokenizer is None:
        raise ActSparseError(f"{model}: no tokenizer saved with the model")
    return tokenizer
