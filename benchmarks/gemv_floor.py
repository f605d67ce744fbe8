"""Where the fixed cost of one input-sparse GEMV launch goes: the split-K sweep at nothing kept.

    PYTHONPATH=src python3 benchmarks/gemv_floor.py --out $OUT [--shapes up,down,o,qkv]

For each Llama-3-8B shape, bf16, batch 1: the tuner's pick at 50% sparsity, then that tile with
split-K 1, 2, 4, ... 64, each timed (`gpu_matrix.graph_time`, rotating weight copies past L2; `--configs` adds more)
with nothing kept (no weight row is read: the launch, the compaction, the split-K arrival and
reduction) and at 50%; an empty Triton kernel gives the launch floor of the same timing.
Prints a table, then one JSON line; writes OUT/gemv_floor.json.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_configs import SHAPES  # noqa: E402
from gpu_matrix import _empty_kernel, emit, copies_for, graph_time, ref_gemv, rel_err  # noqa: E402

from actsparse.kernels import triton_ops as ops  # noqa: E402

SPLITS = (1, 2, 4, 8, 16, 32, 64)


def parse_configs(spec: str) -> list[ops.GemvConfig]:
    """'bn:bk:split:warps[:pipe],...' -> configs (compacting)."""
    out = []
    for item in filter(None, spec.split(",")):
        bn, bk, split, warps, *pipe = item.split(":")
        out.append(ops.GemvConfig(int(bn), int(bk), int(split), int(warps), 3, True, pipe == ["pipe"]))
    return out


def sweep(k: int, n: int, what: str, extra: list[ops.GemvConfig]) -> dict:
    dtype = torch.bfloat16
    copies = copies_for(k * n * 2)
    wts = [(torch.randn(k, n, device="cuda") / math.sqrt(k)).to(dtype) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda").to(dtype)
    half = torch.tensor(float(x.abs().float().quantile(0.5)), device="cuda")
    none = torch.tensor(float("inf"), device="cuda")
    ops.input_sparse_linear(x, wts[0], half, None, None, None, None, 0.5)
    tuned = ops.tuning.tuned()[("gemv", n, k, 1, dtype, False, False, False, ops.tuning.sparsity_bin(0.5))]
    ys = torch.empty(1, n, device="cuda", dtype=dtype)
    rows = []
    max_split = max(1, k // (2 * tuned.bk))
    for cfg in [tuned] + [replace(tuned, split_k=s) for s in SPLITS if s <= max_split and s != tuned.split_k] + extra:
        def call(wt, t, cfg=cfg):
            ops.launch_input_sparse(x, wt, t, None, None, None, None, cfg, ys)

        call(wts[0], half)
        err = rel_err(ys, ref_gemv(x, wts[0], half))
        row = {"config": asdict(cfg), "tuned": cfg == tuned, "programs": triton.cdiv(n, cfg.bn) * cfg.split_k,
               "nothing_kept_us": graph_time([lambda wt=wt: call(wt, none) for wt in wts]) * 1e6,
               "half_kept_us": graph_time([lambda wt=wt: call(wt, half) for wt in wts]) * 1e6, "rel_err": err}
        rows.append(row)
        print(f"{what:<20} bn={cfg.bn:<4} bk={cfg.bk:<3} split={cfg.split_k:<3} {'pipe' if cfg.pipelined else 'comp' if cfg.compact else 'mask'}"
              f"{' (tuned)' if row['tuned'] else '':<8} programs={row['programs']:<5} nothing {row['nothing_kept_us']:5.1f} us"
              f"  50% {row['half_kept_us']:5.1f} us  err {err:.1e}", flush=True)
    del wts
    return {"shape": what, "k": k, "n": n, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "gemv_floor_out"))
    p.add_argument("--shapes", default="up,down,o,qkv", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--configs", default="", help="more configs for every shape: bn:bk:split:warps[:pipe],...")
    args = p.parse_args()
    y = torch.empty(1, device="cuda")
    empty_us = graph_time([lambda: _empty_kernel[(1,)](y)]) * 1e6
    print(f"empty Triton kernel: {empty_us:.1f} us", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "empty_kernel_us": empty_us, "shapes": [sweep(*SHAPES[s], parse_configs(args.configs)) for s in args.shapes.split(",")]}
    emit(args.out, "gemv_floor", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
