"""Weight bandwidth of the CPU kernels per weight dtype and thread count, SmolLM2-135M's shapes.

    .venv/bin/python benchmarks/cpu_kernels_bandwidth.py [--threads 1,2] [--dtypes fp32,bf16,fp16] [--repeats 7]

Each shape's weights are rotated over enough copies (> 4x the 32 MB L3) that every call streams
from memory, as in decode. GB/s counts the weight bytes a call reads (the kept rows only); the
figure is the median over `--repeats` timings of one pass over the copies, by the wall clock
and by the calling thread's CPU time (for one thread on a shared machine the truer figure). Compare with llama.cpp
reading F32 at ~21 GB/s on one thread (issue 27). Last stdout line: one JSON document.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from actsparse.kernels import cpu_ops, load_kernels, ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# name: (in, out, layout) - "in" layouts run input_sparse over W.T, "out" dense_linear over W
SHAPES = {
    "qkv 576x960": (576, 960, "in"),
    "gate+up 576x3072": (576, 3072, "in"),
    "down 1536x576": (1536, 576, "in"),
    "lm_head 576x49152": (576, 49152, "out"),
}
STREAM_BYTES = 128 * 2**20


def median_time(fn, calls: int, repeats: int) -> tuple[float, float]:
    """Median wall seconds per call, and median CPU seconds per call of the calling thread (on a
    shared, oversubscribed machine the second tracks what one scheduled core achieves)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        walls.append((time.perf_counter() - start) / calls)
        cpus.append((time.thread_time() - start_cpu) / calls)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--sparsities", default="0,0.5,0.9")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    load_kernels("cpu")
    print(f"kernel path: {cpu_ops.isa()}")
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for name, (k, n, layout) in SHAPES.items():
            nbytes = k * n * dtype.itemsize
            copies = max(2, STREAM_BYTES // nbytes)
            x = torch.randn(1, k).to(dtype)  # activations in the weights' dtype, as in decode
            if layout == "in":
                ws = [torch.randn(k, n).to(dtype) for _ in range(copies)]
            else:
                ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
            for threads in map(int, args.threads.split(",")):
                cpu_ops.set_threads(threads)
                levels = map(float, args.sparsities.split(",")) if layout == "in" else [0.0]
                for s in levels:
                    it = iter(range(1 << 62))
                    if layout == "in":
                        t = torch.tensor(-1.0 if s == 0 else float(x.float().abs().quantile(s)))  # -1: every row kept
                        kept = int((x.abs() > t).sum())
                        fn = lambda: ops.input_sparse_linear(x, ws[next(it) % copies], t, None, None, None, None, s)  # noqa: E731
                    else:
                        kept = k
                        fn = lambda: ops.dense_linear(x, ws[next(it) % copies], None)  # noqa: E731
                    sec, cpu = median_time(fn, copies, args.repeats)
                    gbs, cpu_gbs = kept / k * nbytes / sec / 1e9, kept / k * nbytes / cpu / 1e9
                    rows.append({"dtype": dname, "shape": name, "threads": threads, "sparsity": s, "us": sec * 1e6,
                                 "gb_s": gbs, "caller_cpu_us": cpu * 1e6, "gb_per_caller_cpu_s": cpu_gbs})
                    print(f"{dname:<5} {name:<18} threads={threads} s={s:.2f} {sec * 1e6:8.1f} us {gbs:6.1f} GB/s"
                          f"  (per caller-CPU-second {cpu_gbs:6.1f} GB/s)", flush=True)
    cpu_ops.set_threads(1)
    print(json.dumps({"isa": cpu_ops.isa(), "rows": rows}))


if __name__ == "__main__":
    main()
