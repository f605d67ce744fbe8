"""benchmarks/methods_gpu.py on the CPU at SmolLM2's shape: a run through `sparsify_` and the
engine, then `--dense-from` taking the dense figure from it (and refusing another dtype's). The runs
are in fp32: a CPU without bf16 arithmetic (AVX2 only) emulates bf16 at a tenth of fp32's speed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "methods_gpu.py"
SRC = str(Path(__file__).parents[1] / "src")


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "smollm2-135m", "--tokens", "4",
                           "--repeats", "1", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.long
def test_a_run_then_one_with_its_dense_figure(tmp_path):
    first = run("--out", str(tmp_path / "a"), "--runs", "teal:0.5", "--dtype", "fp32")
    assert first.returncode == 0, first.stderr[-2000:]
    measured = json.loads((tmp_path / "a" / "methods_gpu.json").read_text())
    (row,) = measured["runs"]
    assert row["dense_source"] == "measured" and abs(row["measured_sparsity"] - 0.5) < 0.05
    assert measured["decode"] == "fed random tokens"
    assert row["speedup"] == row["sparse_tok_s"] / row["dense_tok_s"]

    earlier = str(tmp_path / "a" / "methods_gpu.json")
    second = run("--out", str(tmp_path / "b"), "--runs", "teal:0.4", "--dense-from", earlier, "--dtype", "fp32")
    assert second.returncode == 0, second.stderr[-2000:]
    (row,) = json.loads((tmp_path / "b" / "methods_gpu.json").read_text())["runs"]
    assert row["dense_source"] == earlier
    assert row["dense_tok_s"] == measured["dense_tok_s"]["smollm2-135m"]
    assert "dense smollm2-135m" not in second.stderr  # not timed again

    refused = run("--out", str(tmp_path / "c"), "--runs", "teal:0.4", "--dense-from", earlier, "--dtype", "bf16")
    assert refused.returncode != 0 and "in fp32, this run is" in refused.stderr and "in bf16" in refused.stderr
    assert not (tmp_path / "c").exists()


def test_a_tuning_cache_is_refused_on_the_cpu(tmp_path):
    refused = run("--out", str(tmp_path / "a"), "--runs", "teal:0.5", "--tuning-cache", str(tmp_path / "t.json"))
    assert refused.returncode != 0 and "--tuning-cache: only CUDA runs tune their kernels" in refused.stderr


@pytest.mark.long
def test_sparsify_only_times_the_method_without_decoding(tmp_path):
    with_option = "teal:0.5:recalibrate=false"
    done = run("--out", str(tmp_path / "a"), "--runs", f"{with_option},wina:0.4", "--sparsify-only", "--dtype", "fp32")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "a" / "methods_gpu.json").read_text())["runs"]
    assert [r["method"] for r in rows] == ["teal", "wina"]
    for row, target in zip(rows, (0.5, 0.4)):
        assert abs(row["measured_sparsity"] - target) < 0.05 and row["sparsify_s"] > 0 and row["ideal"] > 1
        assert "speedup" not in row and "dense_tok_s" not in row
    assert "dense smollm2-135m" not in done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith(f"| {with_option} |"))
    assert line.split(" | ")[2:5] == ["-", "-", "-"] and line.split(" | ")[6] == "-"
