"""What each phase of the input-sparse GEMV's fixed chain costs, with nothing kept.

    PYTHONPATH=src python3 benchmarks/gemv_phases.py --out $OUT

Small kernels that each stop after one more phase of `input_sparse_gemv_kernel`'s batch-1
compacting path (the threshold and x loads, the keep mask and cumsum, the index scatter and
re-load behind a barrier, the fp32 tile reduction, the split-K arrival), launched on the grids of
real launches (Llama-3-8B o and up shapes, split-K 1 and the tuner's 33 / 9), timed like the bars
(`gpu_matrix.graph_time`), next to the library kernel itself with nothing kept. The differences
between neighbouring rows are what the phases cost. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_matrix import _empty_kernel, emit, graph_time  # noqa: E402

from actsparse.kernels import triton_ops as ops  # noqa: E402


@triton.jit
def _phases(x_ptr, thr_ptr, idx_ptr, y_ptr, part_ptr, count_ptr, K, N, rows_per_split, split_k,
            PHASE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CHUNK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    k_lo = pid_k * rows_per_split
    k_hi = tl.minimum(k_lo + rows_per_split, K)
    t = tl.load(thr_ptr)
    scratch = idx_ptr + (pid_n * split_k + pid_k).to(tl.int64) * rows_per_split
    n_active = 0
    seen = 0.0
    for c in range(k_lo, k_hi, CHUNK):
        ks = c + tl.arange(0, CHUNK)
        k_ok = ks < k_hi
        xs = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        if PHASE == 1:
            seen += tl.sum(xs, axis=0)
        else:
            keep = (tl.abs(xs) > t) & k_ok
            pos = n_active + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            if PHASE >= 3:
                tl.store(scratch + pos, ks, mask=keep)
            n_active = tl.max(pos, axis=0) + 1  # uses the cumsum, so that it is not compiled away
    if PHASE >= 3:
        tl.debug_barrier()
        jj = tl.arange(0, BK)
        rows = tl.load(scratch + jj, mask=jj < n_active, other=0)
        n_active += tl.sum(rows, axis=0)
    part = tl.zeros([BN], dtype=tl.float32) + seen + n_active
    if PHASE >= 4:
        acc = tl.zeros([BK, BN], dtype=tl.float32) + part[None, :]
        part = tl.sum(acc, axis=0)
    if PHASE >= 5:
        tl.store(part_ptr + pid_k * N + cols, part)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == split_k - 1:
            tl.store(y_ptr + cols, part)
            tl.atomic_xchg(count_ptr + pid_n, 0)
    else:
        tl.store(y_ptr + cols, part)


PHASES = {1: "threshold + x loads", 2: "+ keep mask and cumsum", 3: "+ index scatter, barrier, re-load",
          4: "+ fp32 [BK, BN] tile reduction", 5: "+ split-K partial store and arrival"}


def measure(k: int, n: int, bn: int, bk: int, split: int, what: str) -> list[dict]:
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    none = torch.tensor(float("inf"), device="cuda")
    rows_per_split = triton.cdiv(triton.cdiv(k, split), 16) * 16
    split = triton.cdiv(k, rows_per_split)
    chunk = min(2048, triton.next_power_of_2(rows_per_split))
    blocks = triton.cdiv(n, bn)
    idx = torch.empty(blocks * split * rows_per_split, dtype=torch.int32, device="cuda")
    part = torch.empty(split * n, dtype=torch.float32, device="cuda")
    count = torch.zeros(blocks, dtype=torch.int32, device="cuda")
    y = torch.empty(n, dtype=torch.float32, device="cuda")
    out = []
    for phase, name in PHASES.items():
        if phase == 5 and split == 1:
            continue

        def launch(phase=phase):
            _phases[(blocks, split)](x, none, idx, y, part, count, k, n, rows_per_split, split,
                                     PHASE=phase, BN=bn, BK=bk, CHUNK=chunk, num_warps=4)

        out.append({"phase": phase, "what": name, "us": graph_time([launch]) * 1e6})
    cfg = ops.GemvConfig(bn, bk, split, 4, 3, True)
    wt = torch.zeros(k, n, device="cuda", dtype=torch.bfloat16)
    yb = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    out.append({"phase": 6, "what": "library kernel, nothing kept",
                "us": graph_time([lambda: ops.launch_input_sparse(x, wt, none, None, None, None, None, cfg, yb)]) * 1e6})
    for r in out:
        print(f"{what:<12} bn={bn} bk={bk} split={split:<3} {r['what']:<38} {r['us']:5.2f} us", flush=True)
    return [dict(r, shape=what, k=k, n=n, bn=bn, bk=bk, split=split) for r in out]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "gemv_phases_out"))
    args = p.parse_args()
    y = torch.empty(1, device="cuda")
    empty = graph_time([lambda: _empty_kernel[(1,)](y)]) * 1e6
    print(f"empty Triton kernel: {empty:.2f} us")
    rows = []
    for k, n, bn, bk, split, what in ((4096, 4096, 512, 32, 1, "o"), (4096, 4096, 512, 32, 33, "o"),
                                      (4096, 14336, 512, 32, 9, "up")):
        rows += measure(k, n, bn, bk, split, what)
    result = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "empty_kernel_us": empty, "rows": rows}
    emit(args.out, "gemv_phases", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
