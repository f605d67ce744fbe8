"""`AutoModelForCausalLM.from_pretrained` on a saved directory, through actsparse's quantizer."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import actsparse as asp
from actsparse.errors import ActSparseError
from actsparse.io import dense_hf_config
from tiny import ARCHS, CALIB, EVAL, logits, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_gives_the_sparse_model_of_actsparse_load(tmp_path, arch):
    model = asp.sparsify_(tiny_model(arch), asp.TealConfig(sparsity=0.5), CALIB)
    out = asp.save(model, tmp_path / "out", tiny_tokenizer())
    hf = AutoModelForCausalLM.from_pretrained(out)
    loaded, _ = asp.load(out)
    assert torch.equal(logits(hf), logits(loaded))
    assert torch.equal(logits(hf), logits(model))
    assert hf.actsparse_config == model.actsparse_config


def test_from_pretrained_restores_a_larosa_rotation(tmp_path):
    model = asp.sparsify_(tiny_model("qwen2"), asp.LaRoSAConfig(sparsity=0.5), CALIB)
    out = asp.save(model, tmp_path / "out")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model))


@pytest.fixture()
def saved(tmp_path):
    model = asp.sparsify_(tiny_model("llama"), asp.CatsConfig(sparsity=0.5), CALIB)
    return asp.save(model, tmp_path / "saved", tiny_tokenizer())


def test_state_is_not_a_top_level_safetensors_file(saved):
    assert [p.name for p in saved.glob("*.safetensors")] == ["model.safetensors"]
    weights = load_file(str(saved / "model.safetensors"))
    assert not any(k.endswith(("threshold", "gate_threshold")) for k in weights)
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "actsparse"
    assert config["quantization_config"] == {"quant_method": "actsparse", "format_version": 2, "method": "cats",
                                             "state": "actsparse/state.safetensors", "base_model_type": "llama"}
    assert (saved / config["quantization_config"]["state"]).is_file()


def test_actsparse_save_of_a_from_pretrained_model_round_trips(saved, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(saved)
    again = asp.save(hf, tmp_path / "again")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(again)), logits(hf))


def test_save_pretrained_alone_is_refused_not_written_without_state(saved, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(saved)
    with pytest.raises(ValueError, match="actsparse.*not serializable"):
        hf.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("field,value,message", [("format_version", 3, "format version 3 is not supported"),
                                                 ("method", "teal", "names method 'teal'.*'cats'"),
                                                 ("state", "other.safetensors", "state is 'other.safetensors'")])
def test_from_pretrained_refuses_a_quantization_config_that_does_not_match(saved, field, value, message):
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"][field] = value
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ActSparseError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("base", [None, "actsparse", "no-such-architecture", 3])
def test_from_pretrained_refuses_a_base_model_type_it_cannot_build(saved, base):
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["base_model_type"] = base
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ActSparseError, match=f"base_model_type naming an architecture.*got {base!r}"):
        AutoModelForCausalLM.from_pretrained(saved)
    with pytest.raises(ActSparseError, match="not a model config transformers can read.*base_model_type"):
        asp.load(saved)


def test_a_directory_saved_before_the_actsparse_model_type_still_loads_sparse(saved, tmp_path):
    """Format version 2 as first written: the architecture's model type, no base_model_type."""
    old = shutil.copytree(saved, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = config["quantization_config"].pop("base_model_type")
    (old / "config.json").write_text(json.dumps(config))
    expected = logits(asp.load(saved)[0])
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(old)), expected)
    assert torch.equal(logits(asp.load(old)[0]), expected)


def test_a_format_version_1_directory_still_loads(saved, tmp_path):
    """Version 1: actsparse.json and actsparse.safetensors at the top level, no quantization_config."""
    old = shutil.copytree(saved, tmp_path / "old")
    meta = json.loads((old / "actsparse" / "recipe.json").read_text())
    meta["format_version"] = 1
    (old / "actsparse.json").write_text(json.dumps(meta))
    os.replace(old / "actsparse" / "state.safetensors", old / "actsparse.safetensors")
    shutil.rmtree(old / "actsparse")
    config = dense_hf_config(json.loads((old / "config.json").read_text()))
    (old / "config.json").write_text(json.dumps(config))
    loaded, _ = asp.load(old)
    assert torch.equal(logits(loaded), logits(asp.load(saved)[0]))


def test_without_actsparse_transformers_refuses_the_directory(saved):
    """An unknown quant_method alone would be logged and the model loaded dense; the unknown model
    type makes transformers refuse it."""
    code = ("import sys; from transformers import AutoModelForCausalLM\n"
            f"try: AutoModelForCausalLM.from_pretrained({str(saved)!r})\n"
            "except ValueError as e: print(e)\n"
            "else: sys.exit('loaded')\n"
            "assert 'actsparse' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "has model type `actsparse` but Transformers does not recognize" in done.stdout
