"""benchmarks/rsparse_kl_screen.py on the embedded model with the built-in texts: rows for dense and
each run, held-out text kept out of calibration, a refusal when calibration would reach it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "rsparse_kl_screen.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), TQDM_DISABLE="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--calib", "python-docs:calibration", "--calib-samples", "2",
                           "--heldout-windows", "1", "--ppl", "docs=python-docs:evaluation:1", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.long
def test_rows_for_dense_and_each_run_with_held_out_text(tmp_path):
    done = run("--heldout-docs", "20", "--jsonl", str(tmp_path / "rows.jsonl"), "--runs",
               "teal:allocation=uniform,alpha=1.0,kl_steps=0,statistics_windows=2", "tuned:allocation=uniform,kl_steps=1,statistics_windows=2")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["run"] for r in result["rows"]] == ["dense", "teal", "tuned"] and result["skipped"] == []
    dense, teal, tuned = result["rows"]
    assert dense["heldout"]["sparsity"] == 0.0 and dense["kl_tune"] is None
    for row in (teal, tuned):
        assert all(math.isfinite(row[t]["ppl"]) and row[t]["ppl"] > dense[t]["ppl"] for t in ("heldout", "docs"))
        assert abs(row["heldout"]["sparsity"] - 0.4) < 0.1
    assert teal["kl_tune"] == {"steps": 0} and tuned["kl_tune"]["steps"] == 1
    assert [json.loads(line)["run"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == ["dense", "teal", "tuned"]


def test_held_out_documents_the_calibration_would_reach_are_refused():
    done = run("--heldout-docs", "100000", "--runs", "a:kl_steps=0")
    assert done.returncode != 0 and "the calibration windows would reach the last 100000 documents" in done.stderr
