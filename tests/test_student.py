"""A ProSparse student's weights file: exported once (bf16, tied weights once), loaded back into a
fresh copy of the original, and turned into a saved model by `actsparse sparsify --student`."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from actsparse.io import load
from actsparse.cli import main
from actsparse.errors import ActSparseError
from actsparse.loading import load_model
from actsparse.methods.prosparse import relufy_
from actsparse.train import export_student, load_student
from tiny import EVAL, logits, measured, random_text, tiny_model


def trained_student(base):
    """A ReLU-fied copy of `base` whose weights moved, to bf16-exact values (what an export keeps)."""
    student = copy.deepcopy(base)
    relufy_(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16))
    return student


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen3", "phi3"])
def test_an_exported_student_loads_back_into_a_fresh_copy_of_the_original(tmp_path, arch):
    base = tiny_model(arch)
    student = trained_student(base)
    path = export_student(student, base, tmp_path / "student.safetensors")
    state = load_file(str(path))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert len(state) == len({id(p) for p in base.parameters()})  # tied weights once
    assert [p.name for p in tmp_path.iterdir()] == ["student.safetensors"]

    loaded = load_student(copy.deepcopy(base), path)
    assert "relu" in (getattr(loaded.config, "hidden_act", None), getattr(loaded.config, "hidden_activation", None))
    for (name, a), b in zip(loaded.named_parameters(), student.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(loaded), logits(student))
    assert not torch.allclose(logits(loaded), logits(base))


def test_a_student_of_another_model_or_no_student_is_refused(tmp_path):
    llama, qwen = tiny_model("llama"), tiny_model("qwen3")
    path = export_student(trained_student(llama), llama, tmp_path / "llama.safetensors")
    with pytest.raises(ActSparseError, match="not a student of this model"):
        load_student(copy.deepcopy(qwen), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ActSparseError, match="junk.safetensors: not a readable safetensors file"):
        load_student(copy.deepcopy(llama), tmp_path / "junk.safetensors")


def test_sparsify_with_a_student_saves_the_trained_prosparse_model(tmp_path, model_dir):
    base, _ = load_model(model_dir)
    student = trained_student(base)
    path = export_student(student, base, tmp_path / "student.safetensors")
    common = ["sparsify", str(model_dir), "--method", "prosparse", "--sparsity", "0", "--student", str(path)]

    assert main([*common, "--option", "threshold=0", "-o", str(tmp_path / "relu")]) == 0
    relu, tok = load(tmp_path / "relu")
    assert tok is not None and relu.actsparse_config.threshold == 0.0
    assert relu.actsparse_recipe["student"] == "student.safetensors"
    assert torch.allclose(logits(relu), logits(student), atol=1e-5)  # FATReLU at t = 0 is the ReLU student

    assert main([*common, "--option", "threshold=0.05", "-o", str(tmp_path / "fat")]) == 0
    fat, _ = load(tmp_path / "fat")
    assert measured(fat, EVAL).mlp > measured(relu, EVAL).mlp > 0.3

    evaluation = tmp_path / "eval.txt"
    evaluation.write_text(random_text(300, seed=5))
    assert main(["eval", str(tmp_path / "fat"), "--ppl", str(evaluation), "--seq-len", "32",
                 "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["method"] == "prosparse" and result["sparsity"]["mlp"] > 0.3


def test_the_saved_config_records_the_threshold_the_student_was_trained_under(tmp_path, model_dir, capsys):
    base, _ = load_model(model_dir)
    path = export_student(trained_student(base), base, tmp_path / "student.safetensors", train_threshold=0.1)
    common = ["sparsify", str(model_dir), "--method", "prosparse", "--sparsity", "0", "--student", str(path)]

    assert main([*common, "-o", str(tmp_path / "taken")]) == 0
    assert load(tmp_path / "taken")[0].actsparse_config.train_threshold == 0.1
    assert main([*common, "--option", "train_threshold=0.1", "-o", str(tmp_path / "same")]) == 0

    capsys.readouterr()
    assert main([*common, "--option", "train_threshold=0.2", "-o", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path} was trained under FATReLU 0.1, not train_threshold 0.2" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "other").exists()

    older = tmp_path / "older.safetensors"  # exported before the threshold was recorded
    save_file(load_file(str(path)), str(older))
    assert main([*common[:-1], str(older), "--option", "train_threshold=0.2", "-o", str(tmp_path / "older")]) == 0
    assert load(tmp_path / "older")[0].actsparse_config.train_threshold == 0.2


@pytest.mark.parametrize(
    "method,student,message",
    [
        ("teal", "{tmp}/student.safetensors", "--student holds ProSparse weights: use it with --method prosparse, not teal"),
        ("prosparse", "{tmp}/nope.safetensors", "--student {tmp}/nope.safetensors: no such file"),
    ],
)
def test_bad_student_arguments_are_one_line(tmp_path, model_dir, method, student, message, capsys):
    base, _ = load_model(model_dir)
    export_student(trained_student(base), base, tmp_path / "student.safetensors")
    sparsity = "0.5" if method == "teal" else "0"
    argv = ["sparsify", str(model_dir), "--method", method, "--sparsity", sparsity,
            "--student", student.format(tmp=tmp_path), "-o", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(tmp=tmp_path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_student_of_another_size_is_refused_with_its_file_named(tmp_path):
    import transformers

    from tiny import COMMON

    small = tiny_model("llama")
    wider = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**COMMON, "intermediate_size": 96}))
    path = export_student(trained_student(wider), wider, tmp_path / "wider.safetensors")
    with pytest.raises(ActSparseError, match=r"wider.safetensors: not a student of this model \(.*size mismatch"):
        load_student(copy.deepcopy(small), path)
