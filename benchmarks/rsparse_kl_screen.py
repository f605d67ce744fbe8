"""Issue 28: screen configurations of a method (rsparse-kl by default) on held-out calibration-source text.

    PYTHONPATH=src python benchmarks/rsparse_kl_screen.py [--model GGUF] [--device cuda] [--method rsparse-kl]
        [--sparsity 0.4] [--calib C4_TRAIN.jsonl] [--calib-samples 200] [--heldout-docs 200]
        [--heldout-windows 20] [--ppl NAME=FILE:WINDOWS ...] [--deadline-s S] [--jsonl OUT]
        --runs NAME[:KEY=VALUE[,KEY=VALUE...]] ...

The model is loaded once. Each run sparsifies a fresh copy with `actsparse.sparsify_` (what
`actsparse sparsify` runs) on the first --calib-samples windows of 512 tokens of --calib, the
method's defaults overridden by the run's options, then measures perplexity and sparsity.model
on the last --heldout-docs documents of --calib (neither calibrated on nor one of the bars'
texts: the criterion to choose a configuration by) and on each --ppl text (default WikiText-2
test, 40 windows, and the C4 validation sample, 20). The held-out documents are refused if the
calibration windows would reach them. One row per run as it ends (also appended to --jsonl),
then a table and one JSON line. Runs that would start after --deadline-s are skipped.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

import actsparse as asp
from actsparse.config import make_config, parse_option
from actsparse.data import read_texts, text_batches, tokenize_texts
from actsparse.evaluate import perplexity
from actsparse.loading import load_model

DEFAULT_PPL = ["wikitext2=../shared/data/wikitext2/wiki.test.raw:40", "c4=../shared/data/c4/c4_validation_sample.jsonl:20"]


def parse_run(text: str, method: str) -> tuple[str, dict]:
    name, _, opts = text.partition(":")
    fields = {}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--runs {text!r}: expected NAME:KEY=VALUE,...")
        fields[key] = parse_option(method, key, value)
    return name, fields


def parse_ppl(text: str) -> tuple[str, str, int]:
    name, _, rest = text.partition("=")
    path, _, windows = rest.rpartition(":")
    return name, path, int(windows)


def evaluate(model, tokenizer, texts: dict) -> dict:
    out = {}
    for name, (source, windows) in texts.items():
        r = perplexity(model, tokenizer, source, 512, windows, progress=False)
        out[name] = {"ppl": r["ppl"], "sparsity": r["sparsity"]["model"] if r["sparsity"] else 0.0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="rsparse-kl")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--calib", default="../shared/data/c4/c4_train_sample.jsonl")
    p.add_argument("--calib-samples", type=int, default=200)
    p.add_argument("--heldout-docs", type=int, default=200)
    p.add_argument("--heldout-windows", type=int, default=20)
    p.add_argument("--ppl", action="append", help="NAME=FILE:WINDOWS (repeatable)")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--deadline-s", type=float, default=None)
    p.add_argument("--jsonl", default=None)
    p.add_argument("--no-dense", action="store_true", help="skip the dense row")
    args = p.parse_args()
    start = time.perf_counter()
    runs = [parse_run(r, args.method) for r in args.runs]
    for name, fields in runs:
        make_config(args.method, sparsity=args.sparsity, **fields)  # a bad option fails before the model loads
    model, tokenizer = load_model(args.model)
    docs = read_texts(args.calib)
    calib_docs, heldout = docs[: -args.heldout_docs], docs[-args.heldout_docs:]
    need = args.calib_samples * 512
    if tokenize_texts(tokenizer, calib_docs, max_tokens=need).numel() < need:
        raise SystemExit(f"the calibration windows would reach the last {args.heldout_docs} documents: give fewer")
    calibration = text_batches(tokenizer, calib_docs, args.calib_samples, 512)  # == the CLI's windows of the whole file
    texts = {"heldout": (heldout, args.heldout_windows)}
    for spec in args.ppl or DEFAULT_PPL:
        name, path, windows = parse_ppl(spec)
        texts[name] = (read_texts(path), windows)
    rows, skipped = [], []
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    todo = ([] if args.no_dense else [("dense", None)]) + runs
    for name, fields in todo:
        if args.deadline_s is not None and rows and time.perf_counter() - start + max(r["seconds"] for r in rows) > args.deadline_s:
            skipped.append(name)
            continue
        torch.manual_seed(0)
        m = copy.deepcopy(model).to(args.device)
        t0 = time.perf_counter()
        if fields is not None:
            asp.sparsify_(m, make_config(args.method, sparsity=args.sparsity, **fields), calibration)
        seconds = time.perf_counter() - t0
        row = {"run": name, "options": fields, "seconds": round(seconds, 1), **evaluate(m, tokenizer, texts),
               "kl_tune": getattr(m, "actsparse_recipe", {}).get("kl_tune")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        del m
    names = list(texts)
    print(f"\n{args.method} at {args.sparsity:g} on {device_name}; held-out: last {args.heldout_docs} docs of {args.calib}")
    print("| run | sparsify s | " + " | ".join(f"{n} ppl (sparsity)" for n in names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']} | " + " | ".join(f"{r[n]['ppl']:.3f} ({r[n]['sparsity']:.3f})" for n in names) + " |")
    if skipped:
        print(f"skipped (deadline): {', '.join(skipped)}", file=sys.stderr)
    print(json.dumps({"method": args.method, "sparsity": args.sparsity, "device": device_name, "torch": torch.__version__,
                      "rows": rows, "skipped": skipped}))


if __name__ == "__main__":
    main()
