"""benchmarks/prosparse_chain.py on two hand-made runs: tokens add up along the chain, the sweep
is interpolated linearly between the points around each sparsity, a sparsity the sweep does not
reach gives nothing, and the plot is written."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "prosparse_chain.py"
COLUMNS = ["step", "tokens", "lr", "lambda", "loss", "kd", "hidden", "l1", "sparsity", "seconds"]


def write_run(tmp_path: Path, name: str, tokens: int, lam: float, train_threshold: float | None,
              sweep: list[tuple[float, float]]) -> str:
    log, summary = tmp_path / f"log_{name}.csv", tmp_path / f"summary_{name}.json"
    with log.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for step in (1, 2):
            w.writerow([step, step * tokens // 2, 1e-3, lam, 3.0, 0.1 / step, 0.01, 0.5, 0.8, step])
    config = {"threshold": 0.1, **({"train_threshold": train_threshold} if train_threshold is not None else {})}
    summary.write_text(json.dumps({
        "silu": {"ppl": 30.0}, "silu_sweep_windows": {"ppl": 20.0},
        "progressive": {"tokens": tokens, "train_s": tokens * 0.9, "config": config, "eval": {"ppl": 33.0, "mlp": 0.86, "windows": 8},
                        "sweep": [{"mlp": m, "ppl": p} for m, p in sweep]},
    }))
    return f"{log}={summary}"


def test_chain_table_json_and_plot(tmp_path):
    first = write_run(tmp_path, "a", 1000, 0.6, None, [(0.80, 22.0), (0.90, 26.0)])
    second = write_run(tmp_path, "b", 3000, 0.03, 0.1, [(0.70, 21.0), (0.84, 22.0), (0.87, 23.5)])
    png = tmp_path / "chain.png"
    done = subprocess.run([sys.executable, str(SCRIPT), first, second, "--names", "1,3", "--at", "0.85,0.88",
                           "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    a, b = json.loads(done.stdout.strip().splitlines()[-1])
    assert (a["name"], b["name"]) == ("1", "3")
    assert (a["tokens_total"], b["tokens_start"], b["tokens_total"]) == (1000, 1000, 4000)
    assert (a["train_threshold"], b["train_threshold"]) == (0.0, 0.1)
    assert a["sweep_at"]["0.85"] == pytest.approx(24.0) and a["sweep_at"]["0.88"] == pytest.approx(25.2)
    assert b["sweep_at"]["0.85"] == pytest.approx(22.5) and b["sweep_at"]["0.88"] is None
    assert b["lambda_last"] == pytest.approx(0.03) and b["kd_last"] == pytest.approx(0.05)
    assert "+12.5%" in done.stdout and "FATReLU 0.1" in done.stdout
    assert "chain: 0.0 M tokens in 1.00 h of training" in done.stdout  # 4000 tokens, 3600 s
    assert png.stat().st_size > 10_000


def test_names_must_match_runs(tmp_path):
    run = write_run(tmp_path, "a", 1000, 0.6, None, [(0.80, 22.0), (0.90, 26.0)])
    done = subprocess.run([sys.executable, str(SCRIPT), run, "--names", "1,2"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "2 names for 1 runs" in done.stderr
