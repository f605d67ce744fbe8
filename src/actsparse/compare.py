"""Side-by-side comparison of methods on one model and one text: rows, a table, a Pareto plot."""
from __future__ import annotations

import copy
import os
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .config import DenseConfig, make_config
from .errors import ActSparseError
from .evaluate import eval_windows, perplexity, ppl_p_sparsity
from .io import load, read_meta, saved_tokenizer
from .methods import sparsify_
from .runtime import use_kernels

Saved = Sequence[str | os.PathLike]


def check_saved(saved: Saved, tokenizer, ppl_source, seq_len: int, windows: int | None) -> None:
    """Refuse, naming it, a directory that is not a complete actsparse directory, or whose saved
    tokenizer cuts the perplexity text into other token ids than `tokenizer` (perplexity is per
    token). Reads no weights."""
    reference = None
    for directory in saved:
        read_meta(directory)
        own = saved_tokenizer(directory)
        if own is None:
            continue
        if reference is None:
            reference = eval_windows(tokenizer, ppl_source, seq_len, windows)
        if not torch.equal(eval_windows(own, ppl_source, seq_len, windows), reference):
            raise ActSparseError(
                f"{directory}: its tokenizer gives other token ids for {ppl_source} than the compared model's; "
                "perplexities per token would not be comparable"
            )


def run_comparison(
    model: nn.Module,
    tokenizer,
    methods: list[str],
    sparsities: list[float],
    calibration: torch.Tensor | None,
    ppl_source,
    seq_len: int,
    windows: int | None,
    fields: dict | None = None,
    saved: Saved = (),
    log=print,
    kernels: bool = False,
) -> list[dict]:
    """One row per (method, sparsity), dense first; every model starts from the same dense weights.
    Then one row per saved actsparse directory in `saved`, loaded as saved (its method, config and
    dtype) and measured on `tokenizer`'s windows; its `source` is the directory (None for the other
    rows), its `target` the saved config's sparsity (0 for prosparse, which has no target) and its
    `sparsify_s` None. Each candidate runs its kernels (`runtime.use_kernels`) when `kernels`."""
    check_saved(saved, tokenizer, ppl_source, seq_len, windows)
    plan = [("dense", 0.0)] + [(m, s) for m in methods for s in sparsities if m != "dense"]
    device = next(model.parameters()).device
    builds = [partial(_sparsified, model, method, target, calibration, fields or {}) for method, target in plan]
    builds += [partial(_loaded, directory, device) for directory in saved]
    rows = []
    for i, build in enumerate(builds, 1):
        candidate, built, source = build()
        config = candidate.actsparse_config
        use_kernels(candidate, kernels)
        result = perplexity(candidate, tokenizer, ppl_source, seq_len, windows)
        sparsity = result["sparsity"]
        row = {
            "method": config.method,
            "source": source,
            "target": config.sparsity,
            "targets": config.targets,
            "ppl": result["ppl"],
            "sparsity_model": sparsity["model"],
            "sparsity_mlp": sparsity["mlp"],
            "sparsify_s": built,
            "config": config.to_dict(),
            "per_layer": sparsity["per_layer"],
        }
        rows.append(row)
        log(f"[{i}/{len(builds)}] {row_label(row)} {config.sparsity:g}: ppl {result['ppl']:.3f}, "
            f"measured model sparsity {sparsity['model']:.3f}")
        del candidate
    return rows


def _sparsified(model: nn.Module, method: str, target: float, calibration, fields: dict):
    config = DenseConfig() if method == "dense" else make_config(method, sparsity=target, **fields)
    candidate = copy.deepcopy(model)
    start = time.perf_counter()
    sparsify_(candidate, config, calibration)
    return candidate, time.perf_counter() - start, None


def _loaded(directory: str | os.PathLike, device: torch.device):
    candidate, _ = load(directory, device=device)
    return candidate, None, str(directory)


def row_label(row: dict) -> str:
    """The method, and for a saved model its directory: one label per curve or point."""
    return row["method"] if row.get("source") is None else f"{row['method']} ({row['source']})"


def markdown_table(rows: list[dict], dense_ppl: float | None = None) -> str:
    dense_ppl = dense_ppl or next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    lines = [
        "| method | target | targets | measured model sparsity | measured MLP sparsity | perplexity | vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = f"{100 * (r['ppl'] / dense_ppl - 1):+.1f}%" if dense_ppl else ""
        lines.append(
            f"| {row_label(r)} | {r['target']:.2f} | {r['targets']} | {r['sparsity_model']:.3f} | "
            f"{r['sparsity_mlp']:.3f} | {r['ppl']:.3f} | {delta} |"
        )
    return "\n".join(lines)


def ppl_p_summary(rows: list[dict], p: float = 5.0) -> dict[str, float]:
    """PPL-p% sparsity per method, and per saved model (measured model-level sparsity)."""
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    if dense is None:
        return {}
    labels = sorted({row_label(r) for r in rows} - {"dense"})
    return {k: ppl_p_sparsity([(r["sparsity_model"], r["ppl"]) for r in rows if row_label(r) == k], dense, p) for k in labels}


def pareto_plot(rows: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for label in dict.fromkeys(row_label(r) for r in rows if r is not dense):
        group = [r for r in rows if row_label(r) == label]
        pts = sorted((r["sparsity_model"], r["ppl"]) for r in group)
        if group[0].get("source") is not None:  # a saved model: its own point, not on the method's line
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*", markersize=12, ls="none", label=label)
            continue
        if dense is not None:
            pts = [(0.0, dense["ppl"])] + pts
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
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
