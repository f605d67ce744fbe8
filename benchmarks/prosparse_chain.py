"""A chain of ProSparse runs (each continuing from the last one's exported student) as one record:
per run the tokens so far (and the chain's training time), the training activation, the last lambda, the first-windows perplexity
interpolated at given MLP sparsities from the run's threshold sweep and its all-windows evaluation;
with --plot, lambda, training-batch sparsity, the KL to the teacher and the interpolated
perplexity over the chain's cumulative tokens.

    python benchmarks/prosparse_chain.py LOG=SUMMARY [...] [--names 1,2,...] [--at 0.85,0.88] [--plot PNG]

LOG is a run's training log (as prosparse_gpu.py copies it), SUMMARY its summary.json, in chain
order. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json

from actsparse.train.log import read_log


def at_sparsity(sweep: list[dict], target: float) -> float | None:
    """Perplexity linearly interpolated between the two sweep points around `target` MLP sparsity
    (None: the sweep does not reach it)."""
    points = sorted((p["mlp"], p["ppl"]) for p in sweep)
    for (s0, p0), (s1, p1) in zip(points, points[1:]):
        if s0 <= target <= s1:
            return p0 if s1 == s0 else p0 + (target - s0) / (s1 - s0) * (p1 - p0)
    return None


def activation(record: dict) -> str:
    return f"FATReLU {record['train_threshold']:g}" if record["train_threshold"] else "ReLU"


def load_run(spec: str) -> tuple[list[dict], dict]:
    log, sep, summary = spec.partition("=")
    if not sep:
        raise SystemExit(f"{spec!r}: expected LOG=SUMMARY")
    with open(summary) as f:
        return read_log(log), json.load(f)


def chain(runs: list[tuple[list[dict], dict]], targets: list[float]) -> list[dict]:
    """One record per run, tokens counted from the chain's start."""
    records, start = [], 0
    for rows, summary in runs:
        run = summary["progressive"]
        sweep_ppl = summary["silu_sweep_windows"]["ppl"]
        records.append({
            "tokens_start": start, "tokens": run["tokens"], "tokens_total": start + run["tokens"], "train_s": run["train_s"],
            "train_threshold": run["config"].get("train_threshold") or 0.0,
            "lambda_last": rows[-1]["lambda"], "kd_last": rows[-1]["kd"],
            "silu_sweep_ppl": sweep_ppl,
            "sweep_at": {str(t): at_sparsity(run["sweep"], t) for t in targets},
            "all_windows": {"ppl": run["eval"]["ppl"], "mlp": run["eval"]["mlp"], "windows": run["eval"]["windows"],
                            "threshold": run["config"]["threshold"], "silu_ppl": summary["silu"]["ppl"]},
        })
        start += run["tokens"]
    return records


def plot(runs: list[tuple[list[dict], dict]], records: list[dict], targets: list[float], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = (("lambda", "L1 coefficient"), ("sparsity", "MLP sparsity on training batches"),
              ("kd", "KL to the SiLU teacher"))
    for (rows, _), rec in zip(runs, records):
        tokens = [(rec["tokens_start"] + r["tokens"]) / 1e6 for r in rows]
        for ax, (key, _) in zip(axes.flat, panels):
            ax.plot(tokens, [r[key] for r in rows], color="C1" if rec["train_threshold"] else "C0",
                    label=activation(rec))
    for ax, (key, title) in zip(axes.flat, panels):
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
        ax.legend(handles.values(), handles.keys())
        ax.set(title=title, xlabel="tokens (M)", ylabel=key, yscale="log" if key == "kd" else "linear")
    ax = axes.flat[3]
    for i, target in enumerate(targets):
        ends = [(r["tokens_total"] / 1e6, r["sweep_at"][str(target)]) for r in records if r["sweep_at"][str(target)]]
        ax.plot(*zip(*ends), "o-", color=f"C{i + 2}", label=f"at {target:.0%} MLP sparsity")
    ax.axhline(records[-1]["silu_sweep_ppl"] * 1.15, color="black", linestyle=":", label="SiLU +15%")
    ax.set(title="WikiText-2, first windows, after each run (interpolated)", xlabel="tokens (M)", ylabel="perplexity")
    ax.legend()
    fig.suptitle(f"ProSparse chain of {len(records)} runs, {records[-1]['tokens_total'] / 1e6:.1f} M tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LOG=SUMMARY")
    p.add_argument("--names", default=None, help="comma-separated run names, in order (default: 1, 2, ...)")
    p.add_argument("--at", default="0.85,0.88", help="MLP sparsities to interpolate the sweep at")
    p.add_argument("--plot", default=None, metavar="PNG")
    a = p.parse_args()
    targets = [float(t) for t in a.at.split(",")]
    runs = [load_run(spec) for spec in a.runs]
    names = a.names.split(",") if a.names else [str(i) for i in range(1, len(runs) + 1)]
    if len(names) != len(runs):
        raise SystemExit(f"--names gives {len(names)} names for {len(runs)} runs")
    records = chain(runs, targets)
    print(f"{'run':>3} {'tokens (total)':>17} {'train act':>11} {'lambda':>7} {'kd':>7} "
          + " ".join(f"{'at ' + format(t, '.0%'):>15}" for t in targets) + "  all windows")
    for name, r in zip(names, records):
        cells = []
        for t in targets:
            v = r["sweep_at"][str(t)]
            cells.append(f"{v:7.2f} ({v / r['silu_sweep_ppl'] - 1:+.1%})" if v else f"{'-':>15}")
        w = r["all_windows"]
        r["name"] = name
        print(f"{name:>3} {r['tokens'] / 1e6:6.1f} M ({r['tokens_total'] / 1e6:6.1f} M) {activation(r):>11} {r['lambda_last']:7.3f} "
              f"{r['kd_last']:7.4f} " + " ".join(cells)
              + f"  {w['ppl']:.2f} ({w['ppl'] / w['silu_ppl'] - 1:+.1%}) at {w['mlp']:.3f}, t = {w['threshold']:g}")
    print(f"chain: {records[-1]['tokens_total'] / 1e6:.1f} M tokens in {sum(r['train_s'] for r in records) / 3600:.2f} h of training")
    if a.plot:
        plot(runs, records, targets, a.plot)
        print(f"plot: {a.plot}")
    print(json.dumps(records))


if __name__ == "__main__":
    main()
