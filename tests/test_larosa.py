"""LaRoSA on tiny random models: folded rotations are exact, top-K in the rotated basis, save/load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import actsparse as asp
from actsparse.errors import ActSparseError
from actsparse.io import load, save
from actsparse.measure import measure_sparsity
from actsparse.models import layer_specs
from actsparse.nn import SparseLinear
from actsparse.rotation import (RotatedNorm, attention_heads, eigenbasis, final_norm, norm_consumers, rotate_heads_,
                               rotate_norm_output_, rotate_residual_, scale_free_norm_)
from actsparse.swap import swap_modules
from tiny import ARCHS, CALIB, EVAL, logits, tiny_model




def input_groups(specs):
    groups = {}
    for spec in specs:
        names = spec.linear_names()
        groups[f"{spec.index}:attn"] = [names[r] for r in ("q", "k", "v", "qkv") if r in names]
        groups[f"{spec.index}:mlp"] = [names[r] for r in ("gate", "up", "gate_up") if r in names]
    return groups


def random_rotation(dim, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_rotations_reproduce_the_unrotated_model(arch):
    reference = logits(tiny_model(arch))
    model = tiny_model(arch)
    specs = swap_modules(model)
    consumers = norm_consumers(model, specs, input_groups(specs), CALIB[:1, :8])
    assert len(consumers) == 2 * len(specs)  # one norm per attention input and per MLP input
    for i, (norm, names) in enumerate(consumers.items()):
        q = random_rotation(model.get_submodule(names[0]).in_features, seed=i)
        rotate_norm_output_(model, norm, [model.get_submodule(n) for n in names], q)
    assert sum(isinstance(m, RotatedNorm) for m in model.modules()) == 2 * len(specs)
    torch.testing.assert_close(logits(model), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_head_rotations_reproduce_the_unrotated_model(arch):
    reference = logits(tiny_model(arch))
    model = tiny_model(arch)
    specs = swap_modules(model)
    for spec in specs:
        _, kv_heads, head_dim = attention_heads(model, spec)
        rotate_heads_(model, spec, torch.stack([random_rotation(head_dim, seed=spec.index * 10 + g) for g in range(kv_heads)]))
    torch.testing.assert_close(logits(model), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_head_rotation_lowers_the_error_at_equal_sparsity(arch):
    reference = logits(tiny_model(arch))
    errors = {}
    for head_rotation in (False, True):
        config = asp.LaRoSAConfig(sparsity=0.5, head_rotation=head_rotation, rotated_coefficient=1, unrotated_coefficient=1)
        model = asp.sparsify_(tiny_model(arch), config, CALIB)
        errors[head_rotation] = (logits(model) - reference).pow(2).mean().item()
    assert errors[True] < errors[False]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma2_rotates_the_pre_feedforward_norm_not_the_post_attention_one(arch):
    model = tiny_model(arch)
    specs = swap_modules(model)
    consumers = norm_consumers(model, specs, input_groups(specs), CALIB[:1, :8])
    assert [n.rsplit(".", 1)[1] for n in consumers] == ["input_layernorm", "pre_feedforward_layernorm"] * len(specs)


def test_top_k_on_the_folded_weights_equals_masking_in_the_rotated_basis():
    torch.manual_seed(0)
    weight = torch.randn(40, 32, dtype=torch.float64)
    q = random_rotation(32, seed=1)
    h = torch.randn(6, 32, dtype=torch.float64)
    linear = SparseLinear.from_linear(torch.nn.Linear(32, 40, bias=False).double())
    linear.weight.data.copy_(weight @ q)  # what rotate_norm_output_ folds in
    linear.set_topk(12, 0.625)
    rotated = h @ q  # what RotatedNorm outputs
    kept = rotated * linear.mask(rotated)
    torch.testing.assert_close(linear(rotated), (kept @ q.T) @ weight.T)  # W Q topk(Q^T h), the simulation


def test_eigenbasis_diagonalises_the_damped_covariance():
    x = torch.randn(500, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    values, q = eigenbasis(x.T @ x, 500, damping=0.01)
    h = x.T @ x / 500
    h = h + 0.01 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(q.T @ h @ q, torch.diag(values))
    assert torch.all(values[:-1] >= values[1:])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("target", [0.4, 0.5])
def test_measured_sparsity_is_the_target(arch, target):
    model = asp.sparsify_(tiny_model(arch), asp.LaRoSAConfig(sparsity=target), CALIB)
    with measure_sparsity(model) as meter, torch.no_grad():
        model(EVAL)
    assert meter.report().model == pytest.approx(target, abs=0.02)
    assert not torch.equal(logits(model), logits(tiny_model(arch)))


def test_rotated_and_unrotated_linears_take_the_coefficients_at_the_model_budget():
    model = asp.sparsify_(tiny_model("llama"), asp.LaRoSAConfig(sparsity=0.5), CALIB)
    linears = [m for m in model.modules() if isinstance(m, SparseLinear)]
    total = sum(m.weight.numel() for m in linears)
    assert sum(m.target * m.weight.numel() for m in linears) / total == pytest.approx(0.5, abs=1e-9)
    layer = model.model.layers[1]
    assert layer.self_attn.o_proj.target / layer.self_attn.q_proj.target == pytest.approx(1.5)
    assert layer.mlp.down_proj.target / layer.mlp.gate_proj.target == pytest.approx(1.5)
    assert isinstance(layer.input_layernorm, RotatedNorm) and isinstance(layer.post_attention_layernorm, RotatedNorm)
    assert 0 < model.actsparse_recipe["rotation_reads"] < 1


@pytest.mark.parametrize("head_rotation", [False, True])
@pytest.mark.parametrize("unrotated", ["default", "threshold", "topk"])
def test_unrotated_inputs_take_thresholds_by_default_while_rotated_ones_keep_top_k(head_rotation, unrotated):
    fields = {} if unrotated == "default" else {"unrotated_selection": unrotated}
    config = asp.LaRoSAConfig(sparsity=0.5, head_rotation=head_rotation, **fields)
    model = asp.sparsify_(tiny_model("llama"), config, CALIB)
    unrotated_mode = "topk" if unrotated == "topk" else "threshold"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert [m.mode for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)] == ["topk"] * 5
        assert attn.o_proj.mode == ("topk" if head_rotation else unrotated_mode) and mlp.down_proj.mode == unrotated_mode
    with measure_sparsity(model) as meter, torch.no_grad():
        model(CALIB)
    assert meter.report().model == pytest.approx(0.5, abs=0.02)


def test_rotation_beats_plain_top_k_on_correlated_inputs():
    reference = logits(tiny_model("llama"))
    errors = {}
    for name, config in (("larosa", asp.LaRoSAConfig(sparsity=0.5, rotated_coefficient=1, unrotated_coefficient=1,
                                                    unrotated_selection="topk")),
                         ("teal", asp.TealConfig(sparsity=0.5, selection="topk"))):
        model = asp.sparsify_(tiny_model("llama"), config, CALIB)
        errors[name] = (logits(model) - reference).pow(2).mean().item()
    assert errors["larosa"] < errors["teal"]


def test_sparsity_zero_leaves_the_model_untouched():
    reference = logits(tiny_model("llama"))
    model = asp.sparsify_(tiny_model("llama"), asp.LaRoSAConfig(sparsity=0.0), CALIB)
    assert torch.equal(logits(model), reference)
    assert not any(isinstance(m, RotatedNorm) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2", "qwen3"])
@pytest.mark.parametrize("selection,head_rotation", [("topk", True), ("threshold", False)])
def test_save_load_gives_identical_logits(tmp_path, arch, selection, head_rotation):
    config = asp.LaRoSAConfig(sparsity=0.5, selection=selection, head_rotation=head_rotation)
    model = asp.sparsify_(tiny_model(arch), config, CALIB)
    save(model, tmp_path / "out")
    loaded, _ = load(tmp_path / "out")
    assert sum(isinstance(m, RotatedNorm) for m in loaded.modules()) == 2 * len(layer_specs(loaded))
    assert torch.equal(logits(loaded), logits(model))


def test_ignored_linears_stay_dense_but_read_the_rotated_input():
    config = asp.LaRoSAConfig(sparsity=0.4, ignore=("*.k_proj",))
    model = asp.sparsify_(tiny_model("llama"), config, CALIB)
    layer = model.model.layers[0]
    assert layer.self_attn.k_proj.mode == "dense" and isinstance(layer.input_layernorm, RotatedNorm)


@pytest.mark.parametrize("bad,match", [
    (dict(rotated_coefficient=0), "rotated_coefficient"), (dict(unrotated_coefficient=-1), "unrotated_coefficient"),
    (dict(damping=1.0), "damping"), (dict(unrotated_selection="top-k"), "unrotated_selection"),
    (dict(sparsity=0.97), None),
])
def test_bad_config_values_are_named(bad, match):
    if match is None:  # valid config, unreachable budget: said at sparsify time
        with pytest.raises(ActSparseError, match="cannot be reached"):
            asp.sparsify_(tiny_model("llama"), asp.LaRoSAConfig(**bad), CALIB)
        return
    with pytest.raises(ActSparseError, match=match):
        asp.LaRoSAConfig(sparsity=0.5, **bad)


def test_cli_compare_runs_both_methods(tmp_path, model_dir):
    import json

    from actsparse.cli import main
    from tiny import random_text

    out, text = tmp_path / "cmp", tmp_path / "text.txt"
    text.write_text(random_text(800, seed=1))
    assert main(["compare", str(model_dir), "--methods", "rsparse,larosa", "--sparsity", "0.4,0.5", "--calib", str(text),
                 "--calib-samples", "4", "--calib-seq-len", "64", "--ppl", str(text), "--seq-len", "64",
                 "--windows", "4", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "rsparse", "rsparse", "larosa", "larosa"]
    for r in rows[1:]:
        assert r["sparsity_model"] == pytest.approx(r["target"], abs=0.03)


PRE_NORM_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]


def with_random_norm_gains(model, seed=7):
    """Norm gains away from their init (1, or 0 for Gemma's 1 + w), so folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("arch", PRE_NORM_ARCHS)
def test_residual_rotation_absorbed_in_the_weights_reproduces_the_model(arch):
    reference = logits(with_random_norm_gains(tiny_model(arch)))
    model = with_random_norm_gains(tiny_model(arch))
    specs = swap_modules(model)
    consumers = norm_consumers(model, specs, input_groups(specs), CALIB[:1, :8])
    head_norm = final_norm(model, CALIB[:1, :8])
    gains = {n: scale_free_norm_(model.get_submodule(n), n) for n in [*consumers, head_norm]}
    rotate_residual_(model, specs, consumers, head_norm, gains, random_rotation(model.config.hidden_size, seed=5))
    assert not any(isinstance(m, RotatedNorm) for m in model.modules())
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(logits(model), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_residual_rotation_refuses_post_norms_by_name(arch):
    with pytest.raises(ActSparseError, match=r"post_attention_layernorm .*per-layer"):
        asp.sparsify_(tiny_model(arch), asp.LaRoSAConfig(sparsity=0.5, rotation="residual"), CALIB)


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3"])
def test_residual_rotation_reaches_the_target_and_saves(tmp_path, arch):
    model = asp.sparsify_(with_random_norm_gains(tiny_model(arch)), asp.LaRoSAConfig(sparsity=0.5, rotation="residual"), CALIB)
    assert model.actsparse_recipe["rotation_reads"] == 0
    assert not any(isinstance(m, RotatedNorm) for m in model.modules())
    with measure_sparsity(model) as meter, torch.no_grad():
        model(EVAL)
    assert meter.report().model == pytest.approx(0.5, abs=0.02)
    save(model, tmp_path / "out")
    loaded, _ = load(tmp_path / "out")
    assert torch.equal(logits(loaded), logits(model))


def test_residual_rotation_beats_plain_top_k():
    reference = logits(tiny_model("llama"))
    errors = {}
    for name, config in (("residual", asp.LaRoSAConfig(sparsity=0.5, rotation="residual", rotated_coefficient=1,
                                                       unrotated_coefficient=1, unrotated_selection="topk")),
                         ("teal", asp.TealConfig(sparsity=0.5, selection="topk"))):
        model = asp.sparsify_(tiny_model("llama"), config, CALIB)
        errors[name] = (logits(model) - reference).pow(2).mean().item()
    assert errors["residual"] < errors["teal"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("left_out", [None, 0, -1])
def test_fold_check_passes_rounding_and_catches_a_consumer_left_unrotated(dtype, left_out):
    from actsparse.methods.larosa import check_fold, fold_tolerance

    model = tiny_model("llama", dtype=dtype)
    specs = swap_modules(model)
    probe = CALIB[:1, :16]
    with torch.no_grad():
        reference = model(input_ids=probe, use_cache=False).logits.float()
    consumers = list(norm_consumers(model, specs, input_groups(specs), probe).items())
    for i, (norm, names) in enumerate(consumers):
        linears = [model.get_submodule(n) for n in names]
        if left_out is not None and i == range(len(consumers))[left_out]:
            linears = linears[1:]  # this one reads the rotated output with its weight as it was
        rotate_norm_output_(model, norm, linears, random_rotation(linears[0].in_features, seed=i))
    if left_out is None:
        assert check_fold(model, probe, reference, len(specs)) <= fold_tolerance(dtype, len(specs))
    else:
        with pytest.raises(ActSparseError, match=r"relative error .* allows"):
            check_fold(model, probe, reference, len(specs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_larosa_folds_in_half_precision_and_reports_the_fold_error(dtype):
    model = tiny_model("llama", dtype=dtype)
    asp.sparsify_(model, asp.LaRoSAConfig(sparsity=0.5), calibration=CALIB)
    assert 0 <= model.actsparse_recipe["fold_error"] < 0.05
    assert all(isinstance(m, RotatedNorm) for n, m in model.named_modules() if n.endswith("layernorm"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_rotation_folds_in_half_precision(dtype):
    model = asp.sparsify_(tiny_model("llama", dtype=dtype), asp.LaRoSAConfig(sparsity=0.5, rotation="residual"), CALIB)
    assert model.actsparse_recipe["rotation_reads"] == 0
    assert 0 <= model.actsparse_recipe["fold_error"] < 0.05
    assert model.get_output_embeddings().weight.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_invariance_check_tells_an_rms_norm_from_a_layer_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from actsparse.rotation import _check_rotation_invariant

    q = random_rotation(32, seed=3)
    _check_rotation_invariant(LlamaRMSNorm(32).to(dtype), "rms", q)
    with pytest.raises(ActSparseError, match=r"layer_norm .*not an RMS norm.*per-layer"):
        _check_rotation_invariant(nn.LayerNorm(32).to(dtype), "layer_norm", q)
