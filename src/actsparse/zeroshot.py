"""Zero-shot accuracy through lm-evaluation-harness on the in-memory (possibly sparse) model.

The model object itself is handed to lm-eval's `HFLM`, so the swapped sparse modules are what
runs; nothing is reloaded or copied. Task data come from local JSONL files in the MosaicML
local-eval layout (``{"query", "choices", "gold"}`` for multiple choice, ``{"context",
"continuation"}`` for LAMBADA), read fully offline through task configs shipped in
`actsparse/task_configs/` whose data path is filled in at run time.

A user's own lm-eval task YAMLs (`include_path`, as lm-eval's `--include_path`) run the same way
over their local JSONL/parquet files. Every task name, data file and the fields its templates read
are checked before any model is needed (`resolve_tasks`), so a bad task is one clear error, not a
traceback after the model loaded. lm-eval's lower-level `evaluate` is called rather than
`simple_evaluate`, which runs `git describe` to log a hash (its "fatal: not a git repository").

The built-in prompts are the local-eval layout's (e.g. BoolQ's passage carries a "Passage: " prefix) and
can differ slightly from lm-eval's hub task definitions, so compare these scores with each other
(dense vs sparse of the same model), not with published lm-eval numbers.
"""
from __future__ import annotations

import contextlib
import functools
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
FEWSHOT_SEED = 1234  # lm-eval's default, for a task YAML that asks for few-shot examples


def default_task_dir() -> Path:
    """$ACTSPARSE_TASK_DIR, else ../shared/data/tasks relative to the current directory."""
    env = os.environ.get(TASK_DIR_ENV)
    return Path(env) if env else Path("..") / "shared" / "data" / "tasks"


def task_config(name: str, task_dir: str | Path) -> dict:
    """The lm-eval task config of built-in task `name`, reading its data from `task_dir`."""
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


def resolve_tasks(names: list[str], task_dir: str | Path | None = None,
                  include_path: str | Path | None = None) -> list[dict | str]:
    """lm-eval task specs for `names`: a task of `include_path`'s YAMLs by name, else a built-in
    one as its config (both: data files and the fields their templates read checked), else
    lm-eval's own task definition by its YAML file, when its hub dataset is cached locally."""
    if not names:
        raise ActSparseError(f"no tasks given; valid tasks: {', '.join(TASKS)}")
    own = _own_tasks(include_path)
    specs: list[dict | str] = []
    for name in dict.fromkeys(names):
        if name in own:
            if own[name] is not None:
                _check_task(name, own[name], f"{include_path}")
            specs.append(name)
        elif name in TASKS:
            config = task_config(name, default_task_dir() if task_dir is None else task_dir)
            _check_task(name, config, "built-in")
            specs.append(config)
        else:
            specs.append(_lm_eval_task(name, sorted(own) + list(TASKS), include_path))
    return specs


@functools.lru_cache(maxsize=1)
def _lm_eval_index() -> dict:
    from lm_eval.tasks import TaskManager

    with _quiet_logging():
        return TaskManager().task_index


def _lm_eval_task(name: str, valid: list[str], include_path) -> str:
    """The YAML file of lm-eval's own task `name`, when its hub dataset is in the local cache."""
    entry = _lm_eval_index().get(name)
    if entry is None or entry.yaml_path is None or entry.kind.name != "TASK":
        raise ActSparseError(f"unknown task {name!r}; valid tasks: {', '.join(valid)}"
                             + ("" if include_path else " (or your own lm-eval task YAMLs through --include-path DIR)"))
    dataset, subset = entry.cfg.get("dataset_path"), entry.cfg.get("dataset_name")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        with _quiet_logging():
            datasets.load_dataset_builder(dataset, subset, **(entry.cfg.get("dataset_kwargs") or {}))
    except Exception:  # datasets raises many types for "not in the cache while offline"
        raise ActSparseError(
            f"lm-eval task {name!r} reads the hub dataset {dataset!r}{f' ({subset})' if subset else ''}, which is "
            f"not in this machine's datasets cache and nothing is downloaded; write a task YAML over a local "
            f"JSONL/parquet copy and pass --include-path DIR, or use one of: {', '.join(valid)}") from None
    return str(entry.yaml_path)


def _own_tasks(include_path: str | Path | None) -> dict[str, dict | None]:
    """{name: raw config (None for a group or tag)} of the lm-eval task YAMLs under `include_path`."""
    if include_path is None:
        return {}
    path = Path(include_path)
    if not path.is_dir() and not path.is_file():
        raise ActSparseError(f"{path}: no such task YAML file or folder (--include-path)")
    from lm_eval.tasks import TaskManager

    with _quiet_logging():
        index = TaskManager(include_path=str(path), include_defaults=False).task_index
    if not index:
        raise ActSparseError(f"{path}: no lm-eval task YAML found (a YAML with `task: NAME`)")
    return {name: entry.cfg if entry.kind.name in ("TASK", "PY_TASK") else None for name, entry in index.items()}


LOCAL_FORMATS = {"json": ".jsonl", "parquet": ".parquet"}


def _check_task(name: str, config: dict, where: str) -> None:
    """Local data files exist and their first record has every field the task's templates read."""
    if config.get("dataset_path") not in LOCAL_FORMATS:
        raise ActSparseError(f"task {name!r} ({where}): dataset_path {config.get('dataset_path')!r} is not local; "
                             f"use dataset_path: json (JSONL) or parquet with dataset_kwargs.data_files")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        raise ActSparseError(f"task {name!r} ({where}): no dataset_kwargs.data_files naming its local data")
    if isinstance(files, dict):
        files = [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    elif isinstance(files, str):
        files = [files]
    for file in map(Path, files):
        if not file.is_file():
            raise ActSparseError(f"{file}: data file of task {name!r} not found")
        record = _first_record(file, config["dataset_path"])
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            template = config.get(key)
            if isinstance(template, str) and template not in record:
                _render(template, record, f"{file}: {key} of task {name!r}")


def _first_record(file: Path, kind: str) -> dict:
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(file).read_row_group(0).slice(0, 1).to_pylist()
            record = rows[0] if rows else None
        else:
            with file.open(encoding="utf-8") as f:
                line = f.readline()
            record = json.loads(line) if line.strip() else None
    except (OSError, ValueError) as e:
        raise ActSparseError(f"{file}: not readable as {kind} ({str(e).splitlines()[0]})") from None
    if not isinstance(record, dict):
        raise ActSparseError(f"{file}: empty, or its first record is not an object of fields")
    return record


def _render(template: str, record: dict, what: str) -> None:
    import jinja2

    try:
        jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(**record)
    except jinja2.TemplateError as e:
        raise ActSparseError(f"{what} reads a field the records lack ({e}); their fields: "
                             f"{', '.join(record)}") from None


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    task_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | None = None,
) -> dict[str, dict]:
    """Zero-shot scores per task: {"acc", "acc_norm", "n" (documents scored)}; as in lm-eval,
    acc_norm (log-likelihood per byte of the choice) is defined for ARC, OpenBookQA and PIQA.

    `tasks` are built-in names or names of `include_path`'s task YAMLs; `limit` caps the documents
    per task (the first `limit` of each file)."""
    if limit is not None and limit < 1:
        raise ActSparseError(f"limit must be a positive number of documents, got {limit}")
    if batch_size < 1:
        raise ActSparseError(f"batch_size must be at least 1, got {batch_size}")
    specs = resolve_tasks(tasks, task_dir, include_path)
    names = list(dict.fromkeys(tasks))

    # datasets reads the offline switch when it is first imported, which lm_eval does.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    try:
        with _quiet_logging():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            manager = TaskManager(include_path=None if include_path is None else str(include_path), include_defaults=False)
            loaded = manager.load(specs)
            for task in loaded["tasks"].values():
                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
            # zero-shot log-likelihood scoring draws no random numbers: the caller's RNGs stay as they are
            results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    finally:
        model.train(was_training)
    return {name: _scores(results, name) for name in names}


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
