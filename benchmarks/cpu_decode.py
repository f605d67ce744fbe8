"""CPU: the sparse matvec against PyTorch's dense matvec, and SmolLM2-135M decode, dense vs sparse.

    .venv/bin/python benchmarks/cpu_decode.py [--out benchmarks/results/cpu_decode/cpu_decode_cpu_DATE.json] [--tokens 64] [--threads N]

1. kernel: SmolLM2's decoder shapes (fp32), the weights rotated over more copies than the L3
   holds so that every call streams from memory as in decode; torch's F.linear against the C++
   input-sparse kernel over input-major weights, with 1 thread and with all of torch's threads.
2. decode: the embedded SmolLM2-135M-Instruct (fp32), transformers' own `generate`, then the
   engine dense and sparse (TEAL, uniform, calibrated on the built-in calibration text) at each
   level. Dense and sparse runs alternate, best of `--repeats`, to be fair on a shared machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from actsparse import TealConfig, sparsify_
from actsparse.commands._common import DEFAULT_CALIB, DEFAULT_EVAL
from actsparse.data import read_texts, text_batches, tokenize_texts
from actsparse.engine import DecodeEngine
from actsparse.kernels import load_kernels, ops
from actsparse.speed import environment, hf_generate_speed, measured_sparsity, read_bytes, speed_result
from actsparse.loading import load_model
from actsparse.runtime import use_kernels
from actsparse.swap import swap_modules

SHAPES = {"q/o 576x576": (576, 576), "gate+up 576x3072": (576, 3072), "down 1536x576": (1536, 576)}
L3_BYTES = 32 * 2**20


def best_time(fn, calls: int, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def kernel_section(threads_all: int) -> list[dict]:
    load_kernels("cpu")
    rows = []
    for name, (k, n) in SHAPES.items():
        copies = max(4, 4 * L3_BYTES // (k * n * 4))
        ws = [torch.randn(n, k) for _ in range(copies)]
        wts = [w.T.contiguous() for w in ws]
        x = torch.randn(1, k)
        for threads in sorted({1, threads_all}):
            torch.set_num_threads(threads)
            it = iter(range(1 << 62))
            dense = best_time(lambda: F.linear(x, ws[next(it) % copies]), copies)
            for s in (0.0, 0.25, 0.5, 0.65, 0.9):
                t = torch.tensor(-1.0 if s == 0 else float(x.abs().quantile(s)))
                sparse = best_time(lambda: ops.input_sparse_linear(x, wts[next(it) % copies], t, None, None, None, None, s), copies)
                rows.append({"shape": name, "threads": threads, "sparsity": s, "dense_us": dense * 1e6,
                             "sparse_us": sparse * 1e6, "speedup": dense / sparse, "dense_gb_s": k * n * 4 / dense / 1e9})
                print(f"{name:<18} threads={threads} s={s:.2f} torch {dense * 1e6:7.1f}us sparse {sparse * 1e6:7.1f}us x{dense / sparse:.2f}", flush=True)
    torch.set_num_threads(threads_all)
    return rows


def decode_section(levels: list[float], tokens: int, repeats: int) -> dict:
    model, tokenizer = load_model(None, torch.float32, "cpu")
    prompt = tokenize_texts(tokenizer, read_texts(DEFAULT_EVAL), max_tokens=32)[:32][None]
    out: dict = {"hf_tok_s": hf_generate_speed(model, prompt, tokens), "levels": []}
    print(f"transformers generate: {out['hf_tok_s']:.1f} tok/s", flush=True)
    swap_modules(model)
    calibration = text_batches(tokenizer, DEFAULT_CALIB, n=8, seq_len=256)
    dense_engine = DecodeEngine(model, max_len=32 + tokens)
    dense_engine.generate(prompt, 4)
    for s in levels:
        sparse_model = copy.deepcopy(model)
        sparsify_(sparse_model, TealConfig(sparsity=s), calibration)
        use_kernels(sparse_model)
        sparse_engine = DecodeEngine(sparse_model, max_len=32 + tokens)
        sparse_engine.generate(prompt, 4)
        dense_runs, sparse_runs = [], []
        for _ in range(repeats):
            dense_runs.append(dense_engine.generate(prompt, tokens))
            sparse_runs.append(sparse_engine.generate(prompt, tokens))
        dense = max(dense_runs, key=lambda r: r.tokens_per_s)
        sparse = max(sparse_runs, key=lambda r: r.tokens_per_s)
        measured = measured_sparsity(sparse_model, torch.cat([prompt, sparse.tokens], 1))
        row = speed_result(dense, sparse, measured, *read_bytes(sparse_model), batch=1)
        row["target"] = s
        row["dense_runs"] = [r.tokens_per_s for r in dense_runs]
        row["sparse_runs"] = [r.tokens_per_s for r in sparse_runs]
        out["levels"].append(row)
        print(f"teal {s:.2f} (measured {measured:.3f}): dense {dense.tokens_per_s:.1f} sparse {sparse.tokens_per_s:.1f} tok/s "
              f"x{row['speedup']:.2f} (ideal x{row['ideal_speedup']:.2f})", flush=True)
        del sparse_model, sparse_engine
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=f"benchmarks/results/cpu_decode/cpu_decode_cpu_{time.strftime('%Y-%m-%d')}.json",
                   help="default: benchmarks/results/cpu_decode/cpu_decode_cpu_<today>.json (results/README.md)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--levels", default="0.25,0.4,0.5,0.65,0.9")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"env": environment(torch.device("cpu")), "load_average": os.getloadavg()}
    if not args.skip_kernels:
        result["kernels"] = kernel_section(torch.get_num_threads())
    result["decode"] = decode_section([float(v) for v in args.levels.split(",")], args.tokens, args.repeats)
    result["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
