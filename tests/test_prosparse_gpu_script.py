"""benchmarks/prosparse_gpu.py on a tiny model on the CPU: a call with no time left keeps what it
evaluated for the next, the next trains, evaluates and exports the student, and a run started from
that export (--init) begins where it ended, against the dense model as teacher."""
from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actsparse.loading import load_model
from actsparse.train import ShardedBatches, load_student, pack_texts
from tiny import random_text, saved_tiny_llama

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "prosparse_gpu.py"
sys.path.insert(0, str(SCRIPT.parent))
import prosparse_gpu  # noqa: E402


def run(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_kd(work: Path) -> float:
    with (work / "progressive" / "train_log.csv").open() as f:
        return float(next(csv.DictReader(f))["kd"])


def test_runs_resume_across_calls_and_continue_from_an_export(tmp_path):
    model = saved_tiny_llama(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": random_text(300, seed=s)}) for s in range(8)))
    (tmp_path / "eval.txt").write_text(random_text(400, seed=99))
    common = ["--model", str(model), "--data", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.txt"),
              "--device", "cpu", "--seq-len", "32", "--batch-size", "2", "--eval-seq-len", "64", "--sweep-windows", "1",
              "--schedules", "progressive", "--lr", "5e-3", "--distill", "1.0", "--distill-hidden", "1.0"]
    work, student = tmp_path / "work", tmp_path / "student.safetensors"
    first = [*common, "--out", str(tmp_path / "out1"), "--work", str(work), "--steps", "6", "--export", str(student)]

    stopped = run(*first, "--deadline", "1")
    assert stopped["resume"] == "no time left before --deadline to train progressive" and not student.exists()
    kept = json.loads((work / "summary.json").read_text())
    assert kept["calls"] == 1 and kept["steps"] == 6 and "silu" in kept and "progressive" not in kept

    done = run(*first[:-6], "--out", str(tmp_path / "out2"), "--work", str(work), "--export", str(student))
    summary = json.loads((work / "summary.json").read_text())
    assert done["steps"] == 6 and summary["calls"] == 2 and "resume" not in summary
    assert summary["silu"] == kept["silu"]  # evaluated once, by the first call
    assert summary["progressive"]["step"] == 6 and len(summary["progressive"]["sweep"]) == 9
    assert student.is_file() and (tmp_path / "out2" / "curves.png").is_file()

    run(*common, "--out", str(tmp_path / "out3"), "--work", str(tmp_path / "continued"), "--steps", "2",
        "--stages", "1:0,2:0.1", "--init", str(student))
    # Its first step measured the exported student against the dense model on the first batch.
    base, tok = load_model(model)
    ids = ShardedBatches(pack_texts(tok, [tmp_path / "train.jsonl"], 32), 2, 0, 1, 0).get(0)
    exported = copy.deepcopy(base)
    load_student(exported, student)
    with torch.no_grad():
        p, q = base(input_ids=ids).logits.softmax(-1), exported(input_ids=ids).logits.softmax(-1)
        kd = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert kd > 1e-3 and first_kd(tmp_path / "continued") == pytest.approx(kd, rel=1e-4)
