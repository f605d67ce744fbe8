"""ProSparse on SmolLM2-135M on one GPU: the progressive schedule against constant lambda.

    python benchmarks/prosparse_gpu.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --data wikipedia_en.jsonl.gz,openstax_textbooks.jsonl.gz --eval wiki.test.raw \
        --seconds 160 --out OUT

Both runs start from the same SiLU model and make the same number of steps on the same data,
chosen from a short timed probe so that each takes about --seconds. Each trained model is
evaluated on every WikiText-2 window with FATReLU t = 0.01 (perplexity and measured
sparsity.mlp), then over a FATReLU threshold sweep on the first --sweep-windows windows (the
sparsity/perplexity curve, to compare the two at equal sparsity). OUT receives summary.json
(rewritten after every phase), the two training logs, curves.png; the last stdout line is the
summary as one JSON document. `benchmarks/prosparse_gpu_prepare.sh` packs what a lent GPU needs
and gives the device calls.

A run longer than one device call: give --work DIR on a disk that outlives the call (the lent
machine's /tmp while it stays warm). The first call fixes the steps (--steps, or --seconds of
training over all calls by the probe); training stops in time for --deadline with a checkpoint
under DIR; the same command again resumes it (and skips what DIR already holds: the SiLU
evaluations, finished runs), until every run is trained and evaluated.

Training longer than one lease (or session): --export FILE writes the trained student (bf16, 270 MB
for SmolLM2); fetch it in parts, pack it for the next lease with `prosparse_gpu_prepare.sh FILE`
(its header gives the device calls) and start from it with --init FILE and your own --stages and
--lr; the SiLU model stays the teacher. `actsparse sparsify MODEL --method prosparse --sparsity 0
--student FILE -o DIR` makes a saved model of it anywhere.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from actsparse import DenseConfig, ProSparseConfig, sparsify_
from actsparse.commands._common import parse_stages
from actsparse.outputs import write_json_atomic
from actsparse.errors import ActSparseError
from actsparse.evaluate import perplexity
from actsparse.loading import load_model
from actsparse.methods.prosparse import relufy_, set_fatrelu
from actsparse.models import layer_specs
from actsparse.train import TrainArgs, export_student, finished, load_student, pack_texts, train, train_prosparse
from actsparse.train.log import read_log
from actsparse.train.schedule import L1Schedule

SWEEP = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="comma-separated training files")
    p.add_argument("--eval", required=True, help="WikiText-2 test (wiki.test.raw)")
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=160.0,
                   help="training time per run (with --work: over every call; without, --deadline may shorten it)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: from --seconds and a timed probe)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole script: shortens --seconds so both runs and their evaluations fit")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--preset", default="7b")
    p.add_argument("--stages", default=None, metavar="END:LAMBDA,...", help="own stage table instead of --preset (as actsparse train)")
    p.add_argument("--peak-lambda", type=float, default=None, help="rescale the stage table so its last lambda is this")
    p.add_argument("--threshold", type=float, default=0.01)
    p.add_argument("--train-threshold", type=float, default=0.0, help="FATReLU threshold while training (0: ReLU)")
    p.add_argument("--sweep-windows", type=int, default=48)
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--device", default="cuda")
    p.add_argument("--distill", type=float, default=0.0, help="weight of the KL to the SiLU model in the loss (TrainArgs.distill)")
    p.add_argument("--distill-hidden", type=float, default=0.0,
                   help="weight of the normalized MSE to the SiLU model's per-layer hidden states (TrainArgs.distill_hidden)")
    p.add_argument("--schedules", default="progressive,constant", help="comma-separated runs, from progressive,constant")
    p.add_argument("--work", default=None,
                   help="checkpoints and finished results, on a disk that outlives one call (default: a fresh temporary "
                        "directory); the same command again resumes from it")
    p.add_argument("--compile", action="store_true", help="compile the decoder layers while training (TrainArgs.compile)")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="start every run from these ReLU student weights (an earlier run's --export) instead of the "
                        "SiLU model, which stays the teacher")
    p.add_argument("--export", default=None, metavar="FILE",
                   help="write the last trained student's weights (bf16 safetensors) here, for a later --init")
    a = p.parse_args()
    schedules = a.schedules.split(",")
    if a.init is not None and not Path(a.init).is_file():
        p.error(f"--init {a.init}: no such file")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work is not None else Path(tempfile.mkdtemp(prefix="prosparse-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else a.device
    summary: dict = {"device": device, "torch": torch.__version__}
    if (work / "summary.json").is_file():
        summary = json.loads((work / "summary.json").read_text())
    summary["args"] = vars(a)
    summary["calls"] = summary.get("calls", 0) + 1

    def save() -> None:
        write_json_atomic(out / "summary.json", summary)
        write_json_atomic(work / "summary.json", summary)

    began = time.perf_counter()
    t0 = time.perf_counter()
    base, tok = load_model(a.model, torch.float32, a.device)
    summary["load_s"] = round(time.perf_counter() - t0, 1)

    if "relu_untrained" not in summary:
        dense = copy.deepcopy(base)
        sparsify_(dense, DenseConfig())
        summary["silu"] = _ppl(dense, tok, a, None)
        summary["silu_sweep_windows"] = _ppl(dense, tok, a, a.sweep_windows)
        relu0 = copy.deepcopy(base)
        sparsify_(relu0, ProSparseConfig(threshold=0.0))
        summary["relu_untrained"] = _ppl(relu0, tok, a, a.sweep_windows)
        del dense, relu0
        save()

    t0 = time.perf_counter()
    windows = pack_texts(tok, a.data.split(","), a.seq_len)
    summary["data"] = {"files": a.data.split(","), "windows": windows.shape[0], "tokens": windows.numel(),
                       "pack_s": round(time.perf_counter() - t0, 1)}
    # One run's evaluation: every window once, the sweep windows once per threshold.
    eval_s = summary["silu"]["eval_s"] + len(SWEEP) * summary["silu_sweep_windows"]["eval_s"]
    if "steps" in summary:  # set by the call that began these runs
        if a.steps is not None and a.steps != summary["steps"]:
            p.error(f"--steps {a.steps}: the runs under {work} make {summary['steps']} steps")
    else:
        seconds = a.seconds
        if a.deadline is not None and a.work is None:
            probe = 30.0
            seconds = min(seconds, (a.deadline - (time.perf_counter() - began) - len(schedules) * eval_s - probe - 30.0) / len(schedules))
        summary["seconds_per_run"] = round(seconds, 1)
        summary["steps"] = a.steps or _steps_for(base, windows, a, seconds, work)
    steps = summary["steps"]
    save()

    for schedule in schedules:
        if "eval" in summary.get(schedule, {}):
            continue  # trained and evaluated by an earlier call
        model = copy.deepcopy(base)
        if a.init is not None:
            try:
                load_student(model, a.init)
            except ActSparseError as e:
                raise SystemExit(f"--init: {e}") from None
        config = ProSparseConfig(threshold=a.threshold, train_threshold=a.train_threshold, schedule=schedule,
                                 preset=a.preset, peak_lambda=a.peak_lambda,
                                 stages=parse_stages(a.stages) if a.stages else ())
        time_limit = None
        if a.deadline is not None and a.work is not None:
            time_limit = a.deadline - (time.perf_counter() - began) - eval_s - 30.0
            if time_limit <= 0:
                _stop(summary, save, f"no time left before --deadline to train {schedule}")
                return
        args = TrainArgs(steps=steps, batch_size=a.batch_size, lr=a.lr, warmup=0.03, log_every=max(1, steps // 100),
                         distill=a.distill, distill_hidden=a.distill_hidden, time_limit=time_limit, compile=a.compile)
        run_dir = work / schedule
        resume = run_dir if any(run_dir.glob("checkpoints/step-*/checkpoint.json")) else None
        t0 = time.perf_counter()
        history = train_prosparse(model, windows, config, args, run_dir, resume=resume, progress=False,
                                  teacher=base)
        result = summary.setdefault(schedule, {"train_s": 0.0})
        result["train_s"] = round(result["train_s"] + time.perf_counter() - t0, 3)
        result["step"], result["tokens"] = history[-1]["step"], history[-1]["tokens"]
        shutil.copy(run_dir / "train_log.csv", out / f"{schedule}_log.csv")
        if not finished(history, args):
            _stop(summary, save, f"{schedule} stopped at step {history[-1]['step']} of {steps}, checkpoint in {run_dir}")
            return
        result.update({"config": config.to_dict(), "stages": [list(s) for s in L1Schedule.from_config(config, steps).stages],
                       "tokens_per_s": round(result["tokens"] / result["train_s"]), "final_log": history[-1]})
        result["eval"] = _ppl(model, tok, a, None)
        result["sweep"] = []
        for t in SWEEP:
            set_fatrelu(layer_specs(model), config, t)
            r = _ppl(model, tok, a, a.sweep_windows)
            result["sweep"].append({"threshold": t, "ppl": r["ppl"], "mlp": r["mlp"], "model": r["model"]})
        if a.export is not None:
            export_student(model, base, a.export, config.train_threshold)
            result["exported"] = a.export
        save()
        del model
    summary.pop("resume", None)
    save()
    _plot({s: read_log(work / s / "train_log.csv") for s in schedules}, summary, out / "curves.png")
    print(json.dumps({k: summary[k] for k in ("silu", "steps")} | {
        s: {"ppl": summary[s]["eval"]["ppl"], "mlp": summary[s]["eval"]["mlp"], "tokens": summary[s]["tokens"]}
        for s in schedules}))


def _stop(summary: dict, save, why: str) -> None:
    """End this call before every run is done: the same command again resumes."""
    summary["resume"] = why
    save()
    print(json.dumps({"resume": why, "steps": summary["steps"]}))


def _ppl(model, tok, a, windows) -> dict:
    t0 = time.perf_counter()
    r = perplexity(model, tok, a.eval, seq_len=a.eval_seq_len, windows=windows, progress=False)
    s = r["sparsity"]
    return {"ppl": r["ppl"], "windows": r["ppl_windows"], "mlp": s["mlp"], "model": s["model"],
            "mlp_per_layer": [round(x["mlp"], 4) for x in s["per_layer"]], "eval_s": round(time.perf_counter() - t0, 1)}


def _steps_for(base, windows, a, seconds: float, work: Path) -> int:
    """Steps that fit `seconds`, from the time of steps 5..16 of a throwaway run."""
    probe = copy.deepcopy(base)
    relufy_(probe)
    schedule = L1Schedule(stages=((1, 0.0), (2, 0.01)))
    args = TrainArgs(steps=16, batch_size=a.batch_size, lr=a.lr, log_every=4, distill=a.distill, distill_hidden=a.distill_hidden,
                     compile=a.compile)
    history = train(probe, windows, schedule, args, work / "probe", progress=False, teacher=base if args.distills else None)
    per_step = (history[-1]["seconds"] - history[0]["seconds"]) / 12
    del probe
    return max(50, int(seconds / per_step))


def _plot(logs, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    for name, rows in logs.items():
        steps = [r["step"] for r in rows]
        ax[0, 0].plot(steps, [r["lambda"] for r in rows], label=name)
        ax[0, 1].plot(steps, [r["sparsity"] for r in rows], label=name)
        ax[1, 0].plot(steps, [r["loss"] for r in rows], label=name)
        sweep = summary[name]["sweep"]
        ax[1, 1].plot([s["mlp"] for s in sweep], [s["ppl"] for s in sweep], "o-", label=name)
    base = summary["silu_sweep_windows"]["ppl"]
    ax[1, 1].axhline(base, color="gray", ls=":", label="SiLU original")
    ax[1, 1].axhline(base * 1.15, color="red", ls=":", label="+15%")
    ax[1, 1].axvline(0.85, color="red", ls="--", lw=0.8)
    train_t = summary["args"]["train_threshold"]
    train_act = f"FATReLU t = {train_t:g}" if train_t > 0 else "ReLU"
    for a_, title, ylabel in ((ax[0, 0], "L1 coefficient", "lambda"), (ax[0, 1], f"MLP sparsity on training batches ({train_act})", "sparsity"),
                              (ax[1, 0], "training cross-entropy", "loss")):
        a_.set(title=title, xlabel="step", ylabel=ylabel)
        a_.legend()
    ax[1, 1].set(title=f"WikiText-2, first {summary['args']['sweep_windows']} windows: FATReLU t sweep",
                 xlabel="measured sparsity.mlp", ylabel="perplexity", yscale="log")
    ax[1, 1].legend(fontsize=8)
    fig.suptitle(f"ProSparse on SmolLM2-135M, {summary['steps']} steps per run ({summary['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
