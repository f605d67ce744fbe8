"""actsparse demo: the whole story on the embedded model, offline, in a few minutes on 2 cores."""
from __future__ import annotations

import json
import time

from ..compare import markdown_table, run_comparison
from ..config import CONFIGS, make_config
from ..data import text_batches
from ..generation import generate_text
from ..loading import load_model
from ..methods import HANDLERS, NEEDS_CALIBRATION, sparsify_
from ._common import DEFAULT_CALIB, DEFAULT_EVAL, log

PROMPT = "The three most important things to know about the Python programming language are"


def register(sub) -> None:
    p = sub.add_parser("demo", help="sparsify the embedded SmolLM2 with every training-free method and compare, offline")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--windows", type=int, default=10, help="evaluation windows of 512 tokens (default 10)")
    p.add_argument("--calib-samples", type=int, default=8)
    p.set_defaults(func=run)


def training_free_methods() -> list[str]:
    """Every registered method that needs calibration but neither training nor a calibration-time
    optimisation of the weights (rsparse-kl: minutes on its own, README)."""
    return [name for name, cls in CONFIGS.items()
            if cls in HANDLERS and cls in NEEDS_CALIBRATION and name != "prosparse" and not cls.tunes_weights]


def run(args) -> int:
    start = time.perf_counter()
    make_config("teal", sparsity=args.sparsity)  # validates the number before loading anything
    log("loading the embedded SmolLM2-135M-Instruct (GGUF, dequantized to fp32)")
    model, tokenizer = load_model(None)
    log(f"calibration text: {DEFAULT_CALIB}; evaluation text: {DEFAULT_EVAL} (disjoint halves of Python's own docs)")
    calibration = text_batches(tokenizer, DEFAULT_CALIB, args.calib_samples, 512)
    methods = training_free_methods()
    left_out = sorted(name for name, cls in CONFIGS.items() if cls.tunes_weights)
    if left_out:
        log(f"left out: {', '.join(left_out)} (a calibration-time optimisation of the weights, ~12 minutes on 2 cores: "
            "see README, Methods)")
    rows = run_comparison(model, tokenizer, methods, [args.sparsity], calibration, DEFAULT_EVAL, 512, args.windows, log=log)
    print(f"\nSmolLM2-135M-Instruct, every method at {args.sparsity:g} (targets: model = weight reads skipped, "
          f"mlp = MLP intermediate zeros), perplexity on {args.windows}x512 tokens of {DEFAULT_EVAL}:\n")
    print(markdown_table(rows))
    best = min((r for r in rows if r["method"] != "dense" and r["targets"] == "model"), key=lambda r: r["ppl"])
    sparse = load_model(None)[0]
    sparsify_(sparse, make_config(best["method"], sparsity=args.sparsity), calibration)
    print(f"\nprompt: {PROMPT!r}")
    print(f"  dense          : {generate_text(model, tokenizer, PROMPT, 40)!r}")
    print(f"  {best['method']} {args.sparsity:g} ({best['sparsity_model']:.0%} of weight reads skipped): "
          f"{generate_text(sparse, tokenizer, PROMPT, 40)!r}")
    elapsed = time.perf_counter() - start
    print(f"\ndemo finished in {elapsed:.0f} s")
    print(json.dumps({"rows": [{k: r[k] for k in ("method", "target", "ppl", "sparsity_model", "sparsity_mlp")} for r in rows],
                      "seconds": elapsed}))
    return 0
