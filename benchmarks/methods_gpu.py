"""Every method at a published shape through the product's own path: `sparsify_`, then decode
dense vs sparse in one engine (issue 23).

    PYTHONPATH=src python3 benchmarks/methods_gpu.py --out $OUT [--shape llama3-8b] [--dtype bf16]
        [--runs teal:0.5,larosa:0.5,rsparse:0.5,cats:0.9:act=relu,teal:0.5@mistral-7b] [--budget-s 540] [--tokens 128]
        [--dense-from EARLIER/methods_gpu.json] [--tune-candidates 10] [--tune-budget-s S] [--log-tuning]
        [--tuning-cache EARLIER/tuning.json] [--sparsify-only]

Random weights of the shape (no weights reach a lent GPU), calibrated on random tokens through
`actsparse.sparsify_` with each method's default config, then `DecodeEngine` dense and sparse
(kernels through `runtime.use_kernels`), both fed the same random tokens (since commit 6a75b06;
earlier result files decoded each path's own greedy tokens). A run is METHOD:SPARSITY[:KEY=VALUE...][@SHAPE]: KEY=VALUE
are fields of the method's config, except `act=relu`, which builds the model with a ReLU gate
(CATS on a ReLU gate is FATReLU at the threshold of the calibrated quantile: the gate-driven path
of a ProSparse model); @SHAPE replaces --shape for the run. The dense baseline is timed once per
shape and activation, on the same random weights (same seed). Reported per run:
sparsify seconds, peak GPU memory, measured model-level sparsity, dense and sparse tok/s, and the
ideal speed-up over the reads the sparse model really needs (LaRoSA's rotations and R-Sparse's
factors counted). A table is printed last, then one JSON line; OUT/methods_gpu.json holds it all.
Every kernel choice made so far is written to OUT/tuning.json after each run; `--tuning-cache`
gives such a file of an earlier call on the same GPU model (tuning a kernel alone costs up to
~80 s a problem at 8B), whose choices are then taken untimed.
`--sparsify-only` times each run's `sparsify_` and measures its sparsity without decoding (the
calibration-heavy options at 8B: greedy allocation, search, the KL tune).
`--device cpu --shape smollm2-135m --tokens 16` runs the same code on the CPU (tests).
"""
from __future__ import annotations

import argparse
import ast
import gc
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch

from actsparse.config import make_config
from actsparse.engine import DecodeEngine
from actsparse.errors import ActSparseError
from actsparse.kernels import tuning
from actsparse.speed import (
    SHAPES, environment, ideal_speedup, measured_sparsity, random_calibration, random_model, read_bytes, rotation_reads,
    step_profile, timed_decode,
)
from actsparse.loading import parse_dtype
from actsparse.methods import sparsify_
from actsparse.runtime import use_kernels
from actsparse.swap import swap_modules

PROMPT = 32
SEED = 0


def parse_run(text: str, default_shape: str) -> tuple[str, float, dict, str, dict]:
    """(method, sparsity, config fields, shape, model config overrides) of a run's text."""
    text, _, shape = text.partition("@")
    method, sparsity, *options = text.split(":")
    fields, model_overrides = {}, {}
    for option in options:
        key, _, value = option.partition("=")
        if key == "act":
            model_overrides["hidden_act"] = value
            continue
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value  # a plain string option, e.g. rotation=residual
    shape = shape or default_shape
    if shape not in SHAPES:
        raise SystemExit(f"run {text!r}: unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return method, float(sparsity), fields, shape, model_overrides


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def decode(model, device, args):
    """The fastest of `repeats` decodes; how the in-step tuning went (problems tuned, left to their
    choice alone, seconds of tuning and timing); on CUDA with --profile, GPU time per step by kernel."""
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
    # Both paths are fed the same random tokens (as `actsparse bench` feeds a text): not each its
    # own greedy output, which a sparse model may turn into one repeated token.
    text = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(2))
    engine = DecodeEngine(model, max_len=PROMPT + args.tokens)
    start = time.perf_counter()
    result = timed_decode(engine, prompt, args.tokens, args.repeats, tune_candidates=args.tune_candidates,
                          tune_budget_s=args.tune_budget_s, text=text)
    tuning_info = {"tuned_in_step": len(engine.tuning_report), "untuned": engine.untuned,
                   "tune_and_time_s": time.perf_counter() - start}
    steps = step_profile(engine, prompt, top=30) if args.profile and device.type == "cuda" else None
    return result, steps, tuning_info


def dense_speed(shape: str, overrides: dict, dtype, device, args) -> float:
    model = random_model(shape, dtype, device, seed=SEED, **overrides)
    swap_modules(model)
    result, steps, tuning_info = decode(model, device, args)
    print(f"dense {shape} tuning: {json.dumps(tuning_info)}", file=sys.stderr, flush=True)
    if steps:
        print(f"dense {shape} step profile: {json.dumps(steps)}", file=sys.stderr, flush=True)
    del model
    free_memory(device)
    return result.tokens_per_s


def earlier_dense(path: Path, env: dict, dtype: str) -> dict:
    """{(shape, overrides): (tok/s, path)} of an earlier run, refused unless it ran on this GPU in this dtype."""
    try:
        earlier = json.loads(path.read_text())
        figures, its_env, its_dtype = earlier["dense_tok_s"], earlier["env"], earlier["dtype"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--dense-from {path}: not a methods_gpu.json with dense figures ({type(e).__name__}: {e})")
    if (its_env.get("device_name"), its_dtype) != (env.get("device_name"), dtype):
        raise SystemExit(f"--dense-from {path}: measured on {its_env.get('device_name')} in {its_dtype}, "
                         f"this run is {env.get('device_name')} in {dtype}")
    dense = {}
    for label, tok_s in figures.items():
        shape, _, overrides = label.partition(" ")
        dense[(shape, tuple(sorted(ast.literal_eval(overrides).items())) if overrides else ())] = (tok_s, str(path))
    return dense


def one_run(dtype, device, text: str, dense: dict, args) -> dict:
    method, sparsity, fields, shape, overrides = parse_run(text, args.shape)
    config = make_config(method, sparsity=sparsity, **fields)
    key = (shape, tuple(sorted(overrides.items())))
    if key not in dense and not args.sparsify_only:
        dense[key] = (dense_speed(shape, overrides, dtype, device, args), "measured")
        print(f"dense {shape} {overrides or ''}: {dense[key][0]:.1f} tok/s", file=sys.stderr, flush=True)
    model = random_model(shape, dtype, device, seed=SEED, **overrides)
    calib = random_calibration(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    sparsify_(model, config, calib)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    probe = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(2))
    measured = measured_sparsity(model, probe)
    linear, head = read_bytes(model)
    rotation = rotation_reads(model)
    ideal = ideal_speedup(linear / (linear + head), measured, rotation)
    result = {"run": text, "shape": shape, "model_overrides": overrides, "method": method, "target": sparsity, "options": fields,
              "measured_sparsity": measured, "rotation_reads": rotation, "sparsify_s": seconds, "peak_gb": peak_gb(device),
              "ideal": ideal}
    if args.sparsify_only:
        del model
        free_memory(device)
        return result
    dense_tok_s, dense_source = dense[key]
    use_kernels(model)
    with tuning.recording() as tuned_keys:
        sparse, steps, tuning_info = decode(model, device, args)
    result.update(dense_tok_s=dense_tok_s, sparse_tok_s=sparse.tokens_per_s, speedup=sparse.tokens_per_s / dense_tok_s,
                  dense_source=dense_source, **tuning_info)
    result["fraction_of_ideal"] = result["speedup"] / ideal
    if steps:
        result["step_profile"] = steps
    timings = tuning.timings()
    selections = {str(key): {"chosen": str(tuning.tuned().get(key)), "us": {str(c): t * 1e6 for c, t in timings.get(key, [])}}
                  for key in tuned_keys if key[0] == "topk"}
    if selections:  # each top-K selection's candidates, timed alone (LaRoSA, selection="topk")
        result["topk_timings"] = selections
    del model
    free_memory(device)
    return result


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    head = "| run | measured | dense tok/s | sparse tok/s | speed-up | ideal | of ideal | sparsify s | peak GB |"
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error']} |" + " |" * 7)
            continue
        if "speedup" not in r:  # --sparsify-only
            lines.append(f"| {r['run']} | {r['measured_sparsity']:.3f} | - | - | - | {r['ideal']:.2f}x | - | "
                         f"{r['sparsify_s']:.1f} | {r['peak_gb']:.1f} |")
            continue
        lines.append(f"| {r['run']} | {r['measured_sparsity']:.3f} | {r['dense_tok_s']:.1f} | {r['sparse_tok_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['fraction_of_ideal']:.0%} | {r['sparsify_s']:.1f} | "
                     f"{r['peak_gb']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", default="teal:0.5,larosa:0.5,rsparse:0.5")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also GPU time per decode step by kernel (CUDA)")
    p.add_argument("--budget-s", type=float, default=540.0, help="no new run starts after this many seconds")
    p.add_argument("--tune-candidates", type=int, default=10,
                   help="launch configs tried inside the decode step per tuned kernel (each costs ~1 s on the H200)")
    p.add_argument("--tune-budget-s", type=float, default=None,
                   help="seconds of in-step tuning at most per decode (largest kernels first; default: all)")
    p.add_argument("--log-tuning", action="store_true",
                   help="print one line per kernel problem tuned alone: candidates, seconds, best time")
    p.add_argument("--tuning-cache", metavar="JSON", help="kernel choices of an earlier call on the same GPU model and "
                   "Triton (its OUT/tuning.json), taken instead of tuning those kernels again")
    p.add_argument("--dense-from", metavar="JSON", help="take the dense tok/s of each shape from an earlier "
                   "methods_gpu.json of the same GPU and dtype instead of timing it (~170 s a shape on the H200); "
                   "every row then names that file as its dense source")
    p.add_argument("--sparsify-only", action="store_true",
                   help="time each run's sparsify_ (and measure its sparsity) without decoding: no dense figure, no kernels")
    args = p.parse_args()
    if args.tune_budget_s is not None and not args.tune_budget_s >= 0:
        raise SystemExit(f"--tune-budget-s must be a number of seconds >= 0, got {args.tune_budget_s}")
    if args.log_tuning:
        logging.basicConfig(format="%(message)s", stream=sys.stderr)
        logging.getLogger(tuning.__name__).setLevel(logging.INFO)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    started = time.perf_counter()
    results = {"env": environment(device), "shape": args.shape, "dtype": args.dtype, "decode": "fed random tokens",
               "tune_candidates": args.tune_candidates, "tune_budget_s": args.tune_budget_s, "runs": [], "skipped": []}
    if args.tuning_cache:
        if device.type != "cuda":
            raise SystemExit("--tuning-cache: only CUDA runs tune their kernels")
        try:
            results["tuning_cache"] = {"file": args.tuning_cache, "keys": tuning.load(args.tuning_cache)}
        except ActSparseError as e:
            raise SystemExit(f"--tuning-cache {e}") from None
    dense: dict = {}
    if args.dense_from:
        dense = earlier_dense(Path(args.dense_from), results["env"], args.dtype)
        results["dense_from"] = args.dense_from
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for text in filter(None, args.runs.split(",")):
        if time.perf_counter() - started > args.budget_s:
            results["skipped"].append(text)
            continue
        try:
            row = one_run(dtype, device, text, dense, args)
        except Exception as e:  # one failing method must not lose the others' figures
            traceback.print_exc()
            row = {"run": text, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        results["runs"].append(row)
        print(f"[{time.perf_counter() - started:6.1f}s] {json.dumps(row)}", file=sys.stderr, flush=True)
        results["dense_tok_s"] = {f"{shape}{' ' + str(dict(o)) if o else ''}": v for (shape, o), (v, _) in dense.items()}
        (out / "methods_gpu.json").write_text(json.dumps(results, indent=1))
        if device.type == "cuda":
            tuning.save(out / "tuning.json")
    print(table(results["runs"]))
    if results["skipped"]:
        print(f"skipped (budget): {', '.join(results['skipped'])}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
