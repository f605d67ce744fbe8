"""R-Sparse and LaRoSA against TEAL on the embedded SmolLM2-135M: perplexity at measured sparsity.

Calibration: 16 x 512 tokens of the C4 train sample; perplexity: WikiText-2 test, the first 40
non-overlapping windows of 512 tokens, every token sparsified; sparsity measured while evaluating.
Each row starts from the same dense weights; "sparsify s" is calibration + sparsification time.
Rows ending in "-paper" follow the papers (R-Sparse: plain SVD factors, thresholds from dense
activations; LaRoSA: 0.8 s / 1.2 s, top-K on |x'|); "larosa-residual" rotates the residual stream
in one basis absorbed into the weights (no rotation at inference); the others are actsparse's
defaults.
Prints a table, then one JSON document as the last line.

usage: python benchmarks/accuracy_rsparse_larosa.py [--sparsity 0.4,0.5] [--rows dense,teal,...]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import actsparse as asp
from actsparse.data import text_batches
from actsparse.evaluate import perplexity
from actsparse.loading import load_model

SHARED = Path(__file__).resolve().parents[1] / "../shared/data"
ROWS = {
    "dense": ("dense", {}),
    "teal": ("teal", {}),
    "wina": ("wina", {}),
    "rsparse-paper": ("rsparse", {"alpha": 0.9, "lowrank": "svd", "recalibrate": False}),
    "rsparse": ("rsparse", {}),
    "larosa-paper": ("larosa", {"head_rotation": False, "score": "magnitude", "rotated_coefficient": 0.8,
                                "unrotated_coefficient": 1.2}),
    "larosa": ("larosa", {}),
    "larosa-residual": ("larosa", {"rotation": "residual"}),
    "teal-greedy": ("teal", {"allocation": "greedy"}),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", default="0.4,0.5", help="comma-separated model-level targets")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--calib", default=str(SHARED / "c4/c4_train_sample.jsonl"))
    p.add_argument("--ppl", default=str(SHARED / "wikitext2/wiki.test.raw"))
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--option", action="append", default=[], metavar="ROW:KEY=VALUE",
                   help="override one config field of one row, e.g. rsparse:alpha=0.8 (repeatable)")
    p.add_argument("--row", action="append", default=[], metavar="NAME=METHOD:JSON",
                   help='define one more row, e.g. rs-mag=rsparse:{"score":"magnitude"} (repeatable; add it to --rows)')
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    for item in args.row:
        name, _, spec = item.partition("=")
        method, _, fields = spec.partition(":")
        try:
            ROWS[name] = (method, json.loads(fields or "{}"))
        except json.JSONDecodeError as e:
            p.error(f"--row {item!r}: {e}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    fields = {r: dict(ROWS[r][1]) for r in rows}
    for item in args.option:
        row, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        if row not in fields or not key:
            p.error(f"--option {item!r}: expected ROW:KEY=VALUE with ROW one of {', '.join(rows)}")
        fields[row][key] = json.loads(value)
    sparsities = [float(s) for s in args.sparsity.split(",")]

    model, tokenizer = load_model(args.model, device=args.device)
    calibration = text_batches(tokenizer, args.calib, 16, args.seq_len)
    setup = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, fp32)",
        "device": str(next(model.parameters()).device),
        "calibration": f"{args.calib} (16 x {args.seq_len})",
        "perplexity": f"{args.ppl}, first {args.windows} windows of {args.seq_len}, every token sparsified",
        "machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    results = []
    plan = [(r, 0.0) for r in rows if r == "dense"] + [(r, s) for s in sparsities for r in rows if r != "dense"]
    for name, target in plan:
        method, extra = ROWS[name][0], fields[name]
        config = asp.make_config(method, **({} if method == "dense" else {"sparsity": target, **extra}))
        candidate = copy.deepcopy(model)
        start = time.perf_counter()
        asp.sparsify_(candidate, config, calibration)
        built = time.perf_counter() - start
        result = perplexity(candidate, tokenizer, args.ppl, args.seq_len, args.windows)
        recipe = candidate.actsparse_recipe
        row = {
            "row": name,
            "target": target,
            "ppl": result["ppl"],
            "sparsity_model": result["sparsity"]["model"],
            "sparsity_attn": result["sparsity"]["attn"],
            "sparsity_mlp": result["sparsity"]["mlp"],
            "rotation_reads": recipe.get("rotation_reads", 0.0),
            "sparsify_s": built,
            "config": config.to_dict(),
        }
        if "linears" in recipe:  # R-Sparse: how many linears the allocation gave a low-rank path
            row["lowrank_linears"] = sum(1 for v in recipe["linears"].values() if v["rank"])
            row["linears"] = len(recipe["linears"])
        if "search" in recipe:
            row["search"] = {k: recipe["search"][k] for k in ("start_loss", "loss", "evaluations")}
        results.append(row)
        lowrank = f", low-rank path on {row['lowrank_linears']}/{row['linears']} linears" if "linears" in row else ""
        print(f"{name} {target:g}: ppl {row['ppl']:.3f}, measured model sparsity {row['sparsity_model']:.3f}, "
              f"{built:.0f} s{lowrank}", file=sys.stderr, flush=True)
        del candidate

    dense = next((r["ppl"] for r in results if r["row"] == "dense"), None)
    print(f"{setup['model']}; calibration {setup['calibration']}; perplexity {setup['perplexity']}; "
          f"{setup['machine']}; {setup['date']}")
    print("| row | target | measured sparsity.model | attn | mlp | rotation reads | perplexity | vs dense | sparsify s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        delta = f"{100 * (r['ppl'] / dense - 1):+.1f}%" if dense else ""
        print(f"| {r['row']} | {r['target']:.2f} | {r['sparsity_model']:.3f} | {r['sparsity_attn']:.3f} | "
              f"{r['sparsity_mlp']:.3f} | {r['rotation_reads']:.3f} | {r['ppl']:.2f} | {delta} | {r['sparsify_s']:.0f} |")
    print(json.dumps({"setup": setup, "rows": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
