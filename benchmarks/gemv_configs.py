"""Every launch config of the input-sparse GEMV on Llama-3-8B shapes, against cuBLAS.

    PYTHONPATH=src python3 benchmarks/gemv_configs.py --out $OUT [--workers 8] [--shapes up,down]

For 4096x14336 and 14336x4096 (and, with --shapes, the other linears of Llama-3-8B), bf16, batch 1, at 0 / 50% / 90% input sparsity: cuBLAS dense and
every config of a grid wider than the tuner's candidate list (tile, warps, stages, compacting or
masked, 1-8 waves of split-K programs), each timed as the bars are (`gpu_matrix.graph_time`:
rotating weight copies past L2). Then what the tuner picks from its own candidates, timed the
same way: the gap between the two says whether the tuner or its candidate list loses speed.
Kernels are compiled first by `--workers` processes (the grid is several hundred launches).
Prints a table (best, tuner, cuBLAS per problem), then one JSON line; writes OUT/gemv_configs.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_matrix import copies_for, graph_time, ref_gemv, rel_err  # noqa: E402

from actsparse.kernels import triton_ops as ops  # noqa: E402
from actsparse.kernels import tuning  # noqa: E402

SHAPES = {  # Llama-3-8B: the two bar shapes first, then the other linears of a decode step
    "up": (4096, 14336, "up 4096x14336"), "down": (14336, 4096, "down 14336x4096"),
    "gate_up": (4096, 28672, "gate+up 4096x28672"), "qkv": (4096, 6144, "qkv 4096x6144"),
    "o": (4096, 4096, "o 4096x4096"), "kv": (4096, 1024, "k/v 4096x1024"),
}
PROBLEMS = [SHAPES["up"], SHAPES["down"]]
SPARSITIES = (0.0, 0.5, 0.9)
TILES = ((128, 64), (256, 32), (256, 64), (512, 8), (512, 16), (512, 32), (1024, 8), (1024, 16), (2048, 8))
WAVES = (1, 2, 4, 8)


def grid(k: int, n: int, sms: int) -> list[ops.GemvConfig]:
    out = []
    for (bn, bk), warps, stages, compact in itertools.product(TILES, (4, 8), (2, 3), (True, False)):
        blocks = triton.cdiv(n, bn)
        max_split = max(1, min(64, k // (2 * bk)))
        for waves in WAVES:
            split = max(1, min(max_split, round(waves * sms / blocks)))
            cfg = ops.GemvConfig(bn, bk, split, warps, stages, compact)
            if cfg not in out:
                out.append(cfg)
    return out


def inputs(k: int, n: int, s: float, copies: int):
    torch.manual_seed(0)
    wts = [(torch.randn(k, n, device="cuda") / math.sqrt(k)).to(torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    t = torch.tensor(-1.0 if s == 0 else float(x.abs().float().quantile(s)), device="cuda")
    return wts, x, t


def compile_part(args) -> int:
    """Compile (by launching once) every config of one slice of the work, in a worker process."""
    part, parts, shapes = args
    PROBLEMS[:] = [SHAPES[name] for name in shapes.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    done = 0
    for k, n, _ in PROBLEMS:
        wts, x, t = inputs(k, n, 0.5, 1)
        y = torch.empty(1, n, dtype=x.dtype, device="cuda")
        for i, cfg in enumerate(grid(k, n, sms)):
            if i % parts == part:
                ops.launch_input_sparse(x, wts[0], t, None, None, None, None, cfg, y)
                done += 1
    torch.cuda.synchronize()
    return done


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "gemv_out"))
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--shapes", default="up,down", help=f"comma-separated, from {', '.join(SHAPES)}")
    args = p.parse_args()
    PROBLEMS[:] = [SHAPES[name] for name in args.shapes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        compiled = sum(pool.map(compile_part, [(i, args.workers, args.shapes) for i in range(args.workers)]))
    print(f"compiled {compiled} launches in {time.perf_counter() - start:.0f}s", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for k, n, what in PROBLEMS:
        nbytes = k * n * 2
        copies = copies_for(nbytes)
        for s in SPARSITIES:
            wts, x, t = inputs(k, n, s, copies)
            kept = float((x.abs().float() > t).float().mean())
            ws = [wt.T.contiguous() for wt in wts]  # cuBLAS gets output-major weights: same bytes, its best layout
            dense = graph_time([lambda w=w: F.linear(x, w) for w in ws])
            del ws
            reference = ref_gemv(x, wts[0], t)
            ys = [torch.empty(1, n, dtype=x.dtype, device="cuda") for _ in wts]
            timed = []
            for cfg in grid(k, n, sms):
                ops.launch_input_sparse(x, wts[0], t, None, None, None, None, cfg, ys[0])
                err = rel_err(ys[0], reference)
                if err > 2e-2:
                    raise SystemExit(f"{what} s={s} {cfg}: relative error {err:.2e}")
                us = graph_time([lambda wt=wt, y=y, cfg=cfg: ops.launch_input_sparse(x, wt, t, None, None, None, None, cfg, y)
                                 for wt, y in zip(wts, ys)]) * 1e6
                timed.append((us, cfg))
            timed.sort(key=lambda uc: uc[0])
            tuning.clear()
            ops.input_sparse_linear(x, wts[0], t, None, None, None, None, s)  # the product's path: tunes
            pick = next(iter(tuning.tuned().values()))
            pick_us = next((us for us, cfg in timed if cfg == pick), float("nan"))
            row = {
                "kernel": what, "sparsity": s, "kept": kept, "cublas_us": dense * 1e6,
                "cublas_tb_s": nbytes / dense / 1e12,
                "best_us": timed[0][0], "best": repr(timed[0][1]), "best_speedup": dense * 1e6 / timed[0][0],
                "best_tb_s": nbytes * kept / (timed[0][0] * 1e-6) / 1e12,
                "tuner": repr(pick), "tuner_us": pick_us, "tuner_speedup": dense * 1e6 / pick_us,
                "top": [(round(us, 2), repr(cfg)) for us, cfg in timed[:12]],
                "by_variant": {v: min(us for us, cfg in timed if cfg.compact == (v == "compact")) for v in ("compact", "masked")},
            }
            results.append(row)
            (out / "gemv_configs.json").write_text(json.dumps(results, indent=1))
            print(f"{what:<16} s={s:.2f} cuBLAS {row['cublas_us']:5.1f}us | best {row['best_us']:5.1f}us "
                  f"x{row['best_speedup']:.2f} {row['best']} | tuner {pick_us:5.1f}us x{row['tuner_speedup']:.2f} "
                  f"| compact {row['by_variant']['compact']:.1f} masked {row['by_variant']['masked']:.1f}", flush=True)
            del wts
            torch.cuda.empty_cache()
    print(json.dumps({"rows": [{k: r[k] for k in ("kernel", "sparsity", "cublas_us", "best_us", "best_speedup",
                                                  "tuner_us", "tuner_speedup", "best")} for r in results],
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
