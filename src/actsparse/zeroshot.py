"""Zero-shot accuracy through lm-evaluation-harness on the in-memory (possibly sparse) model.

The model object itself is handed to lm-eval's `HFLM`, so the swapped sparse modules are what
runs; nothing is reloaded or copied. Task data come from local JSONL files in the MosaicML
local-eval layout (``{"query", "choices", "gold"}`` for multiple choice, ``{"context",
"continuation"}`` for LAMBADA), read fully offline through task configs shipped in
`actsparse/task_configs/` whose data path is filled in at run time.

The prompts are the local-eval layout's (e.g. BoolQ's passage carries a "Passage: " prefix) and
can differ slightly from lm-eval's hub task definitions, so compare these scores with each other
(dense vs sparse of the same model), not with published lm-eval numbers.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Iterator

import yaml

from .errors import ActSparseError
from .files import read_text

# Task name -> stem of its config (task_configs/<stem>.yaml) and data file (<task_dir>/<stem>.jsonl).
TASKS = {
    "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge",
    "boolq": "boolq",
    "openbook_qa": "openbook_qa",
    "openbookqa": "openbook_qa",
    "piqa": "piqa",
    "lambada_openai": "lambada_openai",
}
TASK_DIR_ENV = "ACTSPARSE_TASK_DIR"


def default_task_dir() -> Path:
    """$ACTSPARSE_TASK_DIR, else ../shared/data/tasks relative to the current directory."""
    env = os.environ.get(TASK_DIR_ENV)
    return Path(env) if env else Path("..") / "shared" / "data" / "tasks"


def task_config(name: str, task_dir: str | Path) -> dict:
    """The lm-eval task config of `name`, reading its data from `task_dir`."""
    stem = TASKS.get(name)
    if stem is None:
        raise ActSparseError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    data_file = Path(task_dir) / f"{stem}.jsonl"
    if not data_file.is_file():
        raise ActSparseError(
            f"{data_file}: task file for {name!r} not found; pass a task directory holding "
            f"{', '.join(sorted({s + '.jsonl' for s in TASKS.values()}))} (or set ${TASK_DIR_ENV})"
        )
    for lineno, line in enumerate(read_text(data_file).splitlines(), 1):
        try:
            json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise ActSparseError(f"{data_file}:{lineno}: not valid JSON ({e.msg})") from None
    text = resources.files("actsparse").joinpath("task_configs", f"{stem}.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    config["task"] = name
    config["dataset_kwargs"] = {"data_files": {config["test_split"]: str(data_file.resolve())}}
    return config


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    task_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict]:
    """Zero-shot scores per task: {"acc", "acc_norm", "n" (documents scored)}; as in lm-eval,
    acc_norm (log-likelihood per byte of the choice) is defined for ARC, OpenBookQA and PIQA.

    `limit` caps the documents per task (the first `limit` of each file)."""
    if not tasks:
        raise ActSparseError(f"no tasks given; valid tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ActSparseError(f"limit must be a positive number of documents, got {limit}")
    if batch_size < 1:
        raise ActSparseError(f"batch_size must be at least 1, got {batch_size}")
    task_dir = default_task_dir() if task_dir is None else Path(task_dir)
    configs = [task_config(name, task_dir) for name in dict.fromkeys(tasks)]

    # datasets reads the offline switch when it is first imported, which lm_eval does.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    try:
        with _quiet_logging():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = evaluator.simple_evaluate(
                model=lm,
                tasks=configs,
                task_manager=TaskManager(include_defaults=False),
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                # zero-shot log-likelihood scoring draws no random numbers: leave the caller's RNGs alone
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
            )
    finally:
        model.train(was_training)
    return {name: _scores(results, name) for name in dict.fromkeys(tasks)}


def _scores(results: dict, name: str) -> dict:
    metrics = results["results"][name]
    scores = {"acc": float(metrics["acc,none"])}
    if "acc_norm,none" in metrics:
        scores["acc_norm"] = float(metrics["acc_norm,none"])
    scores["n"] = int(results["n-samples"][name]["effective"])
    return scores


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """lm-eval logs every step at INFO/WARNING: keep only its errors and its progress bars, and
    drop the bars of `datasets` converting the JSONL files."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars_were_off = datasets.are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_were_off:
            datasets.enable_progress_bars()
