"""Perplexity of the CPU decode path, fp32 against bf16 weights, dense and sparse (issue 27's 1% bar).

    .venv/bin/python benchmarks/cpu_decode_perplexity.py --text /path/to/wikitext2/wiki.test.raw
        [--windows 4] [--seq-len 128] [--levels 0,0.5] [--dtypes fp32,bf16] [--threads 1]

Every window is decoded one token at a time with teacher forcing through a static KV cache, so
every linear runs the CPU kernels exactly as in decode (batch 1: input-sparse, dense and LM head
kernels, and the decode attention kernel), not the torch reference that a full-window
`actsparse eval` runs. The embedded model,
TEAL calibrated on the built-in calibration text in each dtype. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import StaticCache

from actsparse import TealConfig, sparsify_
from actsparse.attention import use_decode_attention
from actsparse.commands._common import DEFAULT_CALIB
from actsparse.data import text_batches
from actsparse.evaluate import eval_windows
from actsparse.kernels import cpu_ops
from actsparse.loading import load_model, parse_dtype
from actsparse.runtime import use_kernels
from actsparse.swap import swap_modules


@torch.inference_mode()
def decode_nll(model, window: torch.Tensor) -> float:
    """Summed next-token NLL of `window`, fed one token a step through a static cache."""
    cache = StaticCache(config=model.config, max_cache_len=window.numel())
    nll = 0.0
    for i in range(window.numel() - 1):
        logits = model(input_ids=window[None, i:i + 1], past_key_values=cache, cache_position=torch.tensor([i]),
                       use_cache=True).logits
        nll += F.cross_entropy(logits[0, -1:].float(), window[i + 1:i + 2], reduction="sum").item()
    return nll


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", required=True, help="evaluation text file (e.g. WikiText-2's wiki.test.raw)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--levels", default="0,0.5")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=1, help="torch's and the kernels' threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu_ops.set_threads(args.threads)
    rows = []
    for dname in args.dtypes.split(","):
        for level in map(float, args.levels.split(",")):
            model, tokenizer = load_model(None, parse_dtype(dname), "cpu")
            swap_modules(model)
            if level > 0:
                sparsify_(model, TealConfig(sparsity=level), text_batches(tokenizer, DEFAULT_CALIB, n=8, seq_len=256))
            use_kernels(model)
            use_decode_attention(model)  # the decode steps' attention through the C++ kernel, as in DecodeEngine
            windows = eval_windows(tokenizer, args.text, args.seq_len, args.windows)
            nll = sum(decode_nll(model, w) for w in tqdm(windows, desc=f"{dname} {level:g}", unit="win", leave=False))
            tokens = windows.shape[0] * (windows.shape[1] - 1)
            rows.append({"dtype": dname, "sparsity": level, "ppl": math.exp(nll / tokens), "tokens": tokens})
    base = {r["sparsity"]: r["ppl"] for r in rows if r["dtype"] == "fp32"}
    print(f"kernel path {cpu_ops.isa()}; {args.windows} windows of {args.seq_len} tokens, decoded token by token")
    print(f"{'dtype':<6}{'sparsity':>9}{'ppl':>10}{'vs fp32':>9}")
    for r in rows:
        r["vs_fp32"] = r["ppl"] / base[r["sparsity"]] - 1 if r["sparsity"] in base else None
        rel = f"{100 * r['vs_fp32']:+.2f}%" if r["vs_fp32"] is not None else "n/a"
        print(f"{r['dtype']:<6}{r['sparsity']:>9.2f}{r['ppl']:>10.3f}{rel:>9}")
    print(json.dumps({"kernel_path": cpu_ops.isa(), "windows": args.windows, "seq_len": args.seq_len, "rows": rows}))


if __name__ == "__main__":
    main()
