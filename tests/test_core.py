"""Core behaviour on tiny random models of every supported architecture."""
from __future__ import annotations

import contextlib

import pytest
import torch

import actsparse as asp
from actsparse.calibrate import Histogram
from actsparse.errors import ActSparseError
from actsparse.methods import allocation
from actsparse.nn import SparseGatedMLP, SparseLinear, topk_mask
from tiny import ARCHS, CALIB, logits, measured, tiny_model





@pytest.mark.parametrize("arch", ARCHS)
def test_dense_and_sparsity_zero_reproduce_the_model_bitwise(arch):
    reference = logits(tiny_model(arch))
    for config in (asp.DenseConfig(), asp.TealConfig(sparsity=0.0), asp.WinaConfig(sparsity=0.0, selection="topk"),
                   asp.CatsConfig(sparsity=0.0)):
        model = asp.sparsify_(tiny_model(arch), config, CALIB)
        assert torch.equal(logits(model), reference), config
        assert measured(model).model == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_and_mlp_is_swapped(arch):
    model = asp.sparsify_(tiny_model(arch), asp.DenseConfig())
    linears = [m for m in model.modules() if isinstance(m, SparseLinear)]
    mlps = [m for m in model.modules() if isinstance(m, SparseGatedMLP)]
    layers = model.config.num_hidden_layers
    assert len(mlps) == layers
    per_layer = 4 if arch == "phi3" else 7  # fused qkv and gate_up on Phi-3
    assert len(linears) == layers * per_layer


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,selection", [("teal", "threshold"), ("teal", "topk"), ("wina", "threshold"),
                                              ("wina", "topk"), ("cats", "threshold"), ("cats", "topk")])
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_measured_sparsity_reaches_target(arch, method, selection, target):
    model = asp.sparsify_(tiny_model(arch), asp.make_config(method, sparsity=target, selection=selection), CALIB)
    report = measured(model)
    reached = report.mlp if method == "cats" else report.model
    assert reached == pytest.approx(target, abs=0.02)
    assert not torch.equal(logits(model), logits(tiny_model(arch)))


def test_topk_keeps_exactly_k_per_token():
    model = asp.sparsify_(tiny_model("llama"), asp.TealConfig(sparsity=0.4, selection="topk"), CALIB)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, q.in_features)
    assert q.mask(x).sum(-1).unique().tolist() == [q.k] == [round(q.in_features * 0.6)]


def test_topk_ties_keep_the_lower_indices_first():
    score = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert topk_mask(score, 3).tolist() == [[False, True, True, True, False, False], [True, True, True, False, False, False]]
    assert topk_mask(score, 6).all() and topk_mask(score, 1).sum(-1).tolist() == [1, 1]


@pytest.mark.parametrize("method,fields", [
    ("teal", {}), ("wina", {}), ("larosa", {}), ("larosa", {"rotation": "residual"}), ("rsparse", {"alpha": 0.8}),
])
def test_greedy_allocation_keeps_each_block_at_target(method, fields):
    config = asp.make_config(method, sparsity=0.5, allocation="greedy", greedy_tokens=48, **fields)
    model = asp.sparsify_(tiny_model("llama"), config, CALIB)
    allocation = model.actsparse_recipe["allocation"]
    assert len(set(round(v, 3) for v in allocation.values())) > 1, "greedy should not be uniform"
    for layer in model.model.layers:
        mods = [m for m in layer.modules() if isinstance(m, SparseLinear)]
        total = sum(m.weight.numel() for m in mods)
        assert sum(m.target * m.weight.numel() for m in mods) / total == pytest.approx(0.5, abs=1e-6)
    assert measured(model).model == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
@pytest.mark.parametrize("method,fields", [("teal", {}), ("rsparse", {"alpha": 0.8})])
def test_greedy_replaying_known_outputs_changes_nothing(arch, method, fields, monkeypatch):
    config = asp.make_config(method, sparsity=0.5, allocation="greedy", greedy_tokens=48, **fields)
    replayed = asp.sparsify_(tiny_model(arch), config, CALIB).actsparse_recipe["allocation"]
    monkeypatch.setattr(allocation._KnownOutputs, "replaying", lambda self, names: contextlib.nullcontext())
    recomputed = asp.sparsify_(tiny_model(arch), config, CALIB).actsparse_recipe["allocation"]
    assert replayed == recomputed


def test_histogram_quantiles_match_exact_quantiles():
    x = torch.randn(200_000).abs() * 3
    hist = Histogram()
    hist.update(x[:100_000])
    hist.update(x[100_000:])
    for q in (0.1, 0.25, 0.5, 0.9, 0.99):
        assert hist.quantile(q) == pytest.approx(torch.quantile(x[:16_000_000], q).item(), rel=0.01)


def test_histogram_counts_zeros_apart():
    hist = Histogram()
    hist.update(torch.cat([torch.zeros(600), torch.rand(400) + 1]))
    assert hist.quantile(0.5) == 0.0
    assert hist.quantile(0.8) > 1.0


def test_config_round_trip_and_overrides():
    config = asp.TealConfig(sparsity=0.4, allocation="greedy", ignore=("*.0.mlp.down_proj",), overrides=(("*.q_proj", 0.2),))
    assert asp.config_from_dict(config.to_dict()) == config
    assert config.sparsity_for("model.layers.0.mlp.down_proj") is None
    assert config.sparsity_for("model.layers.3.self_attn.q_proj") == 0.2
    assert config.sparsity_for("model.layers.3.self_attn.k_proj") == 0.4
    model = asp.sparsify_(tiny_model("llama"), config, CALIB)
    assert model.model.layers[0].mlp.down_proj.mode == "dense"
    assert model.model.layers[1].self_attn.q_proj.target == 0.2


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(selection="random"), dict(allocation="best")])
def test_bad_config_values_are_named(bad):
    with pytest.raises(ActSparseError, match=next(iter(bad))):
        asp.make_config("teal", **bad)


def test_unknown_method_and_option_are_named():
    with pytest.raises(ActSparseError, match="unknown method 'magic'.*known: .*teal"):
        asp.make_config("magic")
    with pytest.raises(ActSparseError, match="no option.*alpha"):
        asp.make_config("teal", alpha=0.5)
    with pytest.raises(ActSparseError, match="version 9"):
        asp.config_from_dict({**asp.TealConfig().to_dict(), "version": 9})


def test_methods_need_calibration_and_refuse_double_sparsify():
    with pytest.raises(ActSparseError, match="needs calibration"):
        asp.sparsify_(tiny_model("llama"), asp.TealConfig(sparsity=0.5))
    model = asp.sparsify_(tiny_model("llama"), asp.DenseConfig())
    with pytest.raises(ActSparseError, match="already sparsified"):
        asp.sparsify_(model, asp.TealConfig(sparsity=0.5), CALIB)


def test_model_without_gated_mlp_is_refused_with_its_class_name():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ActSparseError, match="GPT2LMHeadModel: no decoder layer list"):
        asp.sparsify_(model, asp.DenseConfig())
    llama = tiny_model("llama")
    del llama.model.layers[1].mlp.gate_proj
    with pytest.raises(ActSparseError, match="LlamaForCausalLM layer 1.*LlamaMLP is not a gated MLP"):
        asp.sparsify_(llama, asp.DenseConfig())
