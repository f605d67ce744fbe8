"""Side-by-side comparison of methods on one model and one text: rows, a table, a Pareto plot."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from .config import DenseConfig, make_config
from .evaluate import perplexity, ppl_p_sparsity
from .methods import sparsify_


def run_comparison(
    model: nn.Module,
    tokenizer,
    methods: list[str],
    sparsities: list[float],
    calibration: torch.Tensor,
    ppl_source,
    seq_len: int,
    windows: int | None,
    fields: dict | None = None,
    log=print,
) -> list[dict]:
    """One row per (method, sparsity), dense first; every model starts from the same dense weights."""
    rows = []
    plan = [("dense", 0.0)] + [(m, s) for m in methods for s in sparsities if m != "dense"]
    for i, (method, target) in enumerate(plan, 1):
        config = DenseConfig() if method == "dense" else make_config(method, sparsity=target, **(fields or {}))
        candidate = copy.deepcopy(model)
        start = time.perf_counter()
        sparsify_(candidate, config, calibration)
        built = time.perf_counter() - start
        result = perplexity(candidate, tokenizer, ppl_source, seq_len, windows)
        sparsity = result["sparsity"]
        rows.append({
            "method": method,
            "target": target,
            "targets": config.targets,
            "ppl": result["ppl"],
            "sparsity_model": sparsity["model"],
            "sparsity_mlp": sparsity["mlp"],
            "sparsify_s": built,
            "config": config.to_dict(),
            "per_layer": sparsity["per_layer"],
        })
        log(f"[{i}/{len(plan)}] {method} {target:g}: ppl {result['ppl']:.3f}, measured model sparsity {sparsity['model']:.3f}")
        del candidate
    return rows


def markdown_table(rows: list[dict], dense_ppl: float | None = None) -> str:
    dense_ppl = dense_ppl or next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    lines = [
        "| method | target | targets | measured model sparsity | measured MLP sparsity | perplexity | vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = f"{100 * (r['ppl'] / dense_ppl - 1):+.1f}%" if dense_ppl else ""
        lines.append(
            f"| {r['method']} | {r['target']:.2f} | {r['targets']} | {r['sparsity_model']:.3f} | "
            f"{r['sparsity_mlp']:.3f} | {r['ppl']:.3f} | {delta} |"
        )
    return "\n".join(lines)


def ppl_p_summary(rows: list[dict], p: float = 5.0) -> dict[str, float]:
    """PPL-p% sparsity per method (measured model-level sparsity)."""
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    if dense is None:
        return {}
    methods = sorted({r["method"] for r in rows} - {"dense"})
    return {m: ppl_p_sparsity([(r["sparsity_model"], r["ppl"]) for r in rows if r["method"] == m], dense, p) for m in methods}


def pareto_plot(rows: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["sparsity_model"], r["ppl"]) for r in rows if r["method"] == method)
        if dense is not None:
            pts = [(0.0, dense["ppl"])] + pts
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    if dense is not None:
        ax.axhline(dense["ppl"], color="gray", lw=0.8, ls="--", label="dense")
    ax.set_xlabel("measured model-level sparsity (fraction of linear weight reads skipped)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
