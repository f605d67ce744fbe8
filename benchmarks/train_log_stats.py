"""Training speed and curve points from `actsparse train` logs (train_log.csv, as prosparse_gpu.py
copies them), to compare runs of different lengths and codes.

    python benchmarks/train_log_stats.py LOG[:STEPS] [...] [--fractions 0.5-0.55,0.9-0.93,0.95-0.98]

Per log: tokens/s over the logged intervals (median, 10th and 90th percentile) once each call's
first --skip-s seconds have passed (compile warm-up; `seconds` restarts at every resumed call),
and the mean KL, hidden term, training-batch sparsity and loss of the rows whose step lies in
each fraction of the run's steps (STEPS, for a run whose log ends before its last step; by
default the last row's step). Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics

from actsparse.train.log import read_log


def speed(rows: list[dict], skip_s: float) -> dict:
    """Tokens/s of each interval between consecutive rows of one call after its first `skip_s` seconds."""
    rates = [(b["tokens"] - a["tokens"]) / (b["seconds"] - a["seconds"])
             for a, b in zip(rows, rows[1:]) if b["seconds"] > a["seconds"] and a["seconds"] > skip_s]
    if len(rates) < 2:
        raise SystemExit(f"too few logged intervals after {skip_s} s to time ({len(rates)})")
    tenths = statistics.quantiles(rates, n=10)
    return {"median_tok_s": round(statistics.median(rates)), "p10_tok_s": round(tenths[0]),
            "p90_tok_s": round(tenths[-1]), "intervals": len(rates)}


def window(rows: list[dict], steps: float, lo: float, hi: float) -> dict | None:
    """Means of the rows with lo * steps < step <= hi * steps (None: no such row)."""
    inside = [r for r in rows if lo * steps < r["step"] <= hi * steps]
    if not inside:
        return None
    return {k: statistics.fmean(r[k] for r in inside) for k in ("lambda", "kd", "hidden", "sparsity", "loss")}


def split_spec(spec: str) -> tuple[str, int | None]:
    """LOG or LOG:STEPS."""
    log, sep, steps = spec.rpartition(":")
    if sep and steps.isdigit():
        return log, int(steps)
    return spec, None


def parse_fractions(text: str) -> dict[str, tuple[float, float]]:
    """{"LO-HI" as written: (lo, hi)}."""
    out = {}
    for item in text.split(","):
        lo, _, hi = item.partition("-")
        try:
            out[item] = (float(lo), float(hi))
        except ValueError:
            raise SystemExit(f"--fractions: {item!r} is not LO-HI (e.g. 0.9-0.93)") from None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", metavar="LOG[:STEPS]")
    p.add_argument("--fractions", default="0.5-0.55,0.9-0.93,0.95-0.98", help="comma-separated LO-HI fractions of the steps")
    p.add_argument("--skip-s", type=float, default=60.0, help="seconds of each call left out of the speed (default 60)")
    a = p.parse_args()
    fractions = parse_fractions(a.fractions)
    results = []
    for spec in a.logs:
        log, steps = split_spec(spec)
        rows = read_log(log)
        steps = steps or rows[-1]["step"]
        result = {"log": log, "steps": steps, "tokens": rows[-1]["tokens"], **speed(rows, a.skip_s),
                  "windows": {name: window(rows, steps, lo, hi) for name, (lo, hi) in fractions.items()}}
        results.append(result)
        print(f"{log}: {result['tokens'] / 1e6:.1f} M tokens by step {rows[-1]['step']:.0f} of {steps:.0f}; "
              f"{result['median_tok_s'] / 1e3:.0f} k tokens/s (p10 {result['p10_tok_s'] / 1e3:.0f} k, "
              f"p90 {result['p90_tok_s'] / 1e3:.0f} k, {result['intervals']} intervals)")
        for name, w in result["windows"].items():
            if w is not None:
                print(f"  {name:>11} of steps: lambda {w['lambda']:.3f} kd {w['kd']:.4f} hidden {w['hidden']:.4f} "
                      f"sparsity {w['sparsity']:.4f} loss {w['loss']:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
