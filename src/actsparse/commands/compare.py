"""actsparse compare [MODEL] --methods teal,cats,wina --sparsity 0.25,0.4,0.5 [--calib FILE] [--ppl FILE] --out DIR"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..compare import markdown_table, pareto_plot, ppl_p_summary, run_comparison
from ..config import make_config
from ..data import read_texts, text_batches
from ..errors import ActSparseError
from ..loading import load_model, parse_dtype
from ._common import (DEFAULT_EVAL, add_calibration, add_method_options, add_model, check_positive, log,
                      method_fields, parse_list, parse_sparsities)


def register(sub) -> None:
    p = sub.add_parser("compare", help="evaluate several methods and sparsities on the same model and text")
    add_model(p)
    p.add_argument("--methods", required=True, help="comma-separated, e.g. teal,cats,wina,rsparse,larosa")
    p.add_argument("--sparsity", required=True, help="comma-separated targets, e.g. 0.25,0.4,0.5")
    add_calibration(p)
    add_method_options(p)
    p.add_argument("--ppl", default=DEFAULT_EVAL, metavar="FILE", help=f"perplexity text (default {DEFAULT_EVAL})")
    p.add_argument("--windows", type=int, default=40, metavar="N", help="perplexity windows (default 40)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L")
    p.add_argument("--out", required=True, metavar="DIR", help="writes results.json, results.md, pareto.png")
    p.set_defaults(func=run)


def run(args) -> int:
    methods = parse_list(args.methods, "--methods")
    sparsities = parse_sparsities(args.sparsity)
    fields = method_fields(args)
    for m in methods:  # fail on a bad name or option before any slow work
        if m != "dense":
            make_config(m, sparsity=sparsities[0], **fields)
    check_positive("--windows", args.windows)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ActSparseError(f"{out}: exists and is not empty")
    texts = read_texts(args.calib)  # a bad file fails before the model loads
    if args.ppl != "wikitext2":
        read_texts(args.ppl)
    model, tokenizer = load_model(args.model, parse_dtype(args.dtype), args.device)
    calibration = text_batches(tokenizer, texts, args.calib_samples, args.calib_seq_len)
    rows = run_comparison(model, tokenizer, methods, sparsities, calibration, args.ppl, args.seq_len, args.windows,
                          fields, log=log)
    table = markdown_table(rows)
    summary = ppl_p_summary(rows)
    header = (f"model: {args.model or 'SmolLM2-135M-Instruct (embedded)'}; calibration: {args.calib} "
              f"({args.calib_samples}x{args.calib_seq_len}); perplexity: {args.ppl}, {args.windows} windows of "
              f"{args.seq_len}; every token sparsified")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / "results.json").write_text(json.dumps({"setup": header, "rows": rows, "ppl_5pct_sparsity": summary}, indent=1))
        (tmp / "results.md").write_text(f"{header}\n\n{table}\n\nPPL-5% sparsity (measured): {json.dumps(summary)}\n")
        pareto_plot(rows, tmp / "pareto.png", title="perplexity vs measured sparsity")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(header)
    print(table)
    print(json.dumps({"rows": [{k: r[k] for k in ("method", "target", "ppl", "sparsity_model", "sparsity_mlp")} for r in rows]}))
    return 0
