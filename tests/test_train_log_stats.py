"""benchmarks/train_log_stats.py on a hand-made log of two calls: the speed leaves out each call's
first seconds, the windows average the rows inside each fraction of the run's steps."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "train_log_stats.py"
COLUMNS = ["step", "tokens", "lr", "lambda", "loss", "kd", "hidden", "l1", "sparsity", "seconds"]


def write_log(path: Path) -> None:
    # Call 1: steps 10..50, 100 tokens per step; 10 steps take 5 s, except the first 20 s of warm-up.
    # Call 2 (resumed, seconds restart): steps 60..80 at 10 steps per 2 s.
    rows = [(10, 20.0), (20, 25.0), (30, 30.0), (40, 35.0), (50, 40.0), (60, 2.0), (70, 4.0), (80, 6.0)]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for step, seconds in rows:
            w.writerow([step, step * 100, 1e-3, step / 100, 3.0, step / 1000, 0.01, 0.5, step / 200, seconds])


def test_speed_and_windows(tmp_path):
    log = tmp_path / "train_log.csv"
    write_log(log)
    done = subprocess.run([sys.executable, str(SCRIPT), f"{log}:100", "--skip-s", "1", "--fractions", "0.25-0.45,0.9-1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])[0]
    # Intervals: call 1 four at 200 tokens/s; call 2 two at 500 (the jump between calls is left out).
    assert result["intervals"] == 6 and result["median_tok_s"] == 200
    assert result["steps"] == 100 and result["tokens"] == 8000
    window = result["windows"]["0.25-0.45"]
    assert window["kd"] == pytest.approx(0.035) and window["sparsity"] == pytest.approx(0.175)
    assert result["windows"]["0.9-1"] is None
