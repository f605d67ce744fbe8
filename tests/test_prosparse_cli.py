"""`actsparse train` end to end on a tiny model saved with an offline tokenizer; the output loads
with `actsparse eval`, whose JSON reports the measured sparsity.mlp."""
from __future__ import annotations

import csv
import json

import pytest

from actsparse.cli import main
from tiny import random_text


@pytest.fixture()
def data(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": random_text(400, seed=s)}) for s in range(4)))
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text(random_text(600, seed=9))
    return train, evaluation


def test_train_then_eval_reports_mlp_sparsity(tmp_path, model_dir, data, capsys):
    train, evaluation = data
    out = tmp_path / "relu"
    args = ["train", str(model_dir), "--method", "prosparse", "--data", f"{train},{evaluation}", "--steps", "8",
            "--seq-len", "32", "--batch-size", "4", "--lr", "5e-3", "--log-every", "2", "--save-every", "4",
            "--device", "cpu", "-o", str(out), "--json", str(tmp_path / "train.json")]
    assert main(args) == 0
    assert "sparsity   mlp" in capsys.readouterr().out
    assert '"hidden_act": "relu"' in (out / "config.json").read_text()
    train_dir = tmp_path / "relu.train"
    rows = list(csv.DictReader((train_dir / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    assert sorted(p.name for p in (train_dir / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["config"]["method"] == "prosparse" and len(summary["log"]) == 4

    result_path = tmp_path / "eval.json"
    assert main(["eval", str(out), "--ppl", str(evaluation), "--seq-len", "32", "--json", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    assert result["method"] == "prosparse"
    assert result["config"]["threshold"] == 0.01
    assert 0.3 < result["sparsity"]["mlp"] < 1.0
    assert result["sparsity"]["model"] > 0

    # Resuming from the step-4 checkpoint replays steps 5..8 and rewrites the model.
    assert main([*args[:-2], "--resume", str(train_dir / "checkpoints" / "step-000004"), "--overwrite"]) == 0
    resumed = list(csv.DictReader((train_dir / "train_log.csv").open()))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(resumed) == strip(rows)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "teal"], "cannot be trained"),
        (["--schedule", "cosine"], "schedule must be one of"),
        (["--threshold", "-1"], "threshold must be"),
        (["--data", "{tmp}/nope.jsonl"], "nope.jsonl: no such file"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--distill-hidden", "-1"], "distill_hidden must be >= 0"),
        (["--time-limit", "0"], "time_limit must be > 0 seconds"),
        (["--stages", "0.3-0,1:0.2"], "'0.3-0' is not END:LAMBDA"),
        (["--stages", "0.5:0,0.3:0.2"], "increasing end steps"),
    ],
)
def test_bad_input_is_one_line(tmp_path, model_dir, data, extra, message, capsys):
    train, _ = data
    extra = [e.format(tmp=tmp_path) for e in extra]
    argv = ["train", str(model_dir), "--data", str(train), "-o", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_own_stage_table_sets_the_lambda_of_every_step(tmp_path, model_dir, data):
    train, _ = data
    assert main(["train", str(model_dir), "--data", str(train), "--steps", "4", "--seq-len", "32", "--batch-size", "2",
                 "--log-every", "1", "--stages", "1:0, 2:0.5, 4:1", "--device", "cpu", "-o", str(tmp_path / "out"),
                 "--json", str(tmp_path / "train.json")]) == 0
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["config"]["stages"] == [[1.0, 0.0], [2.0, 0.5], [4.0, 1.0]]
    # step 0 in stage 0, step 1 at the warm-up lambda, steps 2-3 on the half-sine ramp to 1
    assert [row["lambda"] for row in summary["log"]] == pytest.approx([0.0, 0.5, 0.5, 0.75])


def test_a_time_limit_stops_at_a_checkpoint_without_a_model_and_resume_finishes(tmp_path, model_dir, data, capsys):
    train, _ = data
    args = ["train", str(model_dir), "--data", str(train), "--steps", "6", "--seq-len", "32", "--batch-size", "4",
            "--lr", "5e-3", "--log-every", "1", "--device", "cpu"]
    out = tmp_path / "relu"
    assert main([*args, "-o", str(out), "--time-limit", "1e-9", "--json", str(tmp_path / "stopped.json")]) == 0
    checkpoint = tmp_path / "relu.train" / "checkpoints" / "step-000001"
    err = capsys.readouterr().err
    assert f"stopped at the time limit after step 1 of 6; checkpoint in {checkpoint}" in err
    assert f"run the same command with --resume {tmp_path / 'relu.train'}" in err
    assert (checkpoint / "model.safetensors").is_file() and not out.exists()
    summary = json.loads((tmp_path / "stopped.json").read_text())
    assert summary["finished"] is False and summary["output"] is None and summary["log"][-1]["step"] == 1

    # The resumed run (compiled this time: neither flag is part of the run) finishes like an uninterrupted one.
    resume = ["--resume", str(tmp_path / "relu.train"), "--compile", "--json", str(tmp_path / "done.json")]
    assert main([*args, "-o", str(out), *resume]) == 0
    assert '"hidden_act": "relu"' in (out / "config.json").read_text()
    summary = json.loads((tmp_path / "done.json").read_text())
    assert summary["finished"] is True and summary["output"] == str(out) and summary["train_args"]["compile"] is True
    assert main([*args, "-o", str(tmp_path / "whole")]) == 0
    read = lambda d: [{k: float(v) for k, v in r.items() if k != "seconds"}
                      for r in csv.DictReader((d / "train_log.csv").open())]
    resumed, whole = read(tmp_path / "relu.train"), read(tmp_path / "whole.train")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed == [pytest.approx(r, rel=1e-4) for r in whole]
