"""Time of one CPU decode-attention call (`actsparse::decode_attention`) by filled cache length.

    .venv/bin/python benchmarks/cpu_attention.py [--keys 32,96,160] [--dtypes fp32,bf16] [--threads 1,2]
        [--heads 9] [--kv-heads 3] [--head-dim 64] [--cache 160] [--calls 2000]

One query token against a static cache of `--cache` positions of which the first KEYS are
filled (a boolean mask, as `DecodeEngine` passes it), SmolLM2-135M's heads by default. The
figure is the median over 5 timings of `--calls` calls from Python, so it includes the op call
itself (`torch.add` of two small tensors, printed alongside, for scale). Prints a table, then one
JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from actsparse.kernels import cpu_ops, ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def per_call_us(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", default="32,96,160")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cache", type=int, default=160)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    keys = [int(k) for k in args.keys.split(",")]
    if min(keys) < 1 or max(keys) > args.cache:
        p.error(f"--keys must lie in 1..--cache ({args.cache}), got {args.keys}")
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    torch.set_num_threads(1)
    cpu_ops.library()
    rows = []
    with torch.inference_mode():
        x = torch.randn(1, 576)
        add_us = per_call_us(lambda: torch.add(x, x), args.calls)
        for threads in (int(t) for t in args.threads.split(",")):
            cpu_ops.set_threads(threads)
            for name in args.dtypes.split(","):
                dtype = DTYPES[name]
                q = torch.randn(1, args.heads, 1, args.head_dim).to(dtype)
                k, v = torch.randn(2, 1, args.kv_heads, args.cache, args.head_dim).to(dtype)
                for n in keys:
                    mask = (torch.arange(args.cache) < n)[None, None, None]
                    us = per_call_us(lambda: ops.decode_attention(q, k, v, mask, args.head_dim ** -0.5, 0.0), args.calls)
                    rows.append({"threads": threads, "dtype": name, "keys": n, "us_per_call": us})
    print(f"actsparse::decode_attention, {args.heads} query / {args.kv_heads} KV heads of {args.head_dim}, "
          f"kernel path {cpu_ops.isa()}; torch.add of [1, 576]: {add_us:.1f} us a call")
    print(f"{'threads':>7} {'dtype':>6} {'keys':>5} {'us/call':>8}")
    for r in rows:
        print(f"{r['threads']:>7} {r['dtype']:>6} {r['keys']:>5} {r['us_per_call']:>8.1f}")
    print(json.dumps({"kernel_path": cpu_ops.isa(), "heads": args.heads, "kv_heads": args.kv_heads,
                      "head_dim": args.head_dim, "cache": args.cache, "add_us": add_us, "rows": rows}))


if __name__ == "__main__":
    main()
