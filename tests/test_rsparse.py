"""R-Sparse on tiny random models: budget arithmetic, exactness, WINA equivalence, search, save/load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import actsparse as asp
from actsparse.errors import ActSparseError
from actsparse.io import load, save
from actsparse.methods.rsparse import OVERSAMPLE, dropped_factors, rsparse_budget, svd_factors
from actsparse.methods.search import budget_scaled, evolve, kl_from, lm_loss, log_probs
from actsparse.nn import SparseLinear, dense_baseline
from actsparse.nn.linear import same_selection
from tiny import ARCHS, CALIB, logits, measured, tiny_model

SEARCH = dict(allocation="search", search_generations=2, search_population=4, search_windows=1)




@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536), (64, 128)])
@pytest.mark.parametrize("sparsity", [0.25, 0.4, 0.5, 0.65])
@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.7, 0.5])
def test_budget_reads_equal_a_plain_layer_at_s(shape, sparsity, alpha):
    in_f, out_f = shape
    channel_sparsity, rank = rsparse_budget(in_f, out_f, sparsity, alpha)
    paper_rank = in_f * out_f * (1 - sparsity) * (1 - alpha) / (in_f + out_f)  # k = in (1 - s) alpha
    assert rank == int(paper_rank + 1e-9)
    reads = (1 - channel_sparsity) * in_f * out_f + rank * (in_f + out_f)
    assert reads == pytest.approx(in_f * out_f * (1 - sparsity), rel=1e-12)
    kept, paper_kept = in_f * (1 - channel_sparsity), in_f * (1 - sparsity) * alpha
    assert paper_kept - 1e-9 <= kept < paper_kept + (in_f + out_f) / out_f  # rounding leftovers buy channels
    if alpha == 1.0:
        assert (channel_sparsity, rank) == (sparsity, 0)


def test_full_rank_factors_restore_the_dropped_channels():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 32)
    sparse = SparseLinear.from_linear(linear)
    sparse.set_threshold(1.0, 0.6, scale=torch.rand(48) + 0.5)
    sparse.set_lowrank(*svd_factors(linear.weight, 32))
    x = torch.randn(5, 48)
    assert sparse.mask(x).float().mean() < 0.8  # some channels really are dropped
    torch.testing.assert_close(sparse(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsity_zero_is_the_dense_model_bitwise(arch):
    reference = logits(tiny_model(arch))
    for config in (asp.RSparseConfig(sparsity=0.0), asp.RSparseConfig(sparsity=0.0, selection="topk", alpha=0.5)):
        model = asp.sparsify_(tiny_model(arch), config, CALIB)
        assert torch.equal(logits(model), reference)
        assert measured(model).model == 0.0


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_alpha_one_is_wina_masking(arch, selection):
    # WINA's calibration, each linear its own selection
    config = asp.RSparseConfig(sparsity=0.5, alpha=1.0, selection=selection, recalibrate=False, shared_selection=False)
    rsparse = asp.sparsify_(tiny_model(arch), config, CALIB)
    wina = asp.sparsify_(tiny_model(arch), asp.WinaConfig(sparsity=0.5, selection=selection, recalibrate=False), CALIB)
    assert all(m.rank == 0 for m in rsparse.modules() if isinstance(m, SparseLinear))
    assert torch.equal(logits(rsparse), logits(wina))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_measured_sparsity_counts_the_low_rank_reads_and_reaches_target(arch, selection):
    model = asp.sparsify_(tiny_model(arch), asp.RSparseConfig(sparsity=0.5, alpha=0.8, selection=selection), CALIB)
    assert any(m.rank > 0 for m in model.modules() if isinstance(m, SparseLinear))
    assert measured(model).model == pytest.approx(0.5, abs=0.02)


def test_randomized_svd_factors_are_the_same_on_every_run():
    weight = torch.randn(96, 128)
    assert 2 * (8 + OVERSAMPLE) < min(weight.shape)  # the randomized path
    torch.manual_seed(1)
    first = svd_factors(weight, 8)
    torch.manual_seed(2)
    after = torch.randn(1)  # what the caller's stream gives next
    torch.manual_seed(2)
    second = svd_factors(weight, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.randn(1), after)  # the caller's random stream is left as it was


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_shared_selection_gives_each_group_one_selection_at_the_plans_reads(selection):
    config = asp.RSparseConfig(sparsity=0.5, alpha=0.8, selection=selection, shared_selection=True)
    model = asp.sparsify_(tiny_model("llama"), config, CALIB)
    own = asp.sparsify_(tiny_model("llama"), asp.RSparseConfig(sparsity=0.5, alpha=0.8, selection=selection), CALIB)
    for layer, own_layer in zip(model.model.layers, own.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            assert all(same_selection(group[0], m) for m in group[1:])
        assert not same_selection(own_layer.self_attn.q_proj, own_layer.self_attn.k_proj)

    def reads(recipe):  # kept channels times out, plus the low-rank factors
        return sum(m.out_features * m.in_features * (1 - recipe[n]["channel_sparsity"]) + recipe[n]["rank"] * (m.in_features + m.out_features)
                   for n, m in model.named_modules() if n in recipe)

    assert reads(model.actsparse_recipe["linears"]) == pytest.approx(reads(own.actsparse_recipe["linears"]), rel=1e-9)
    assert measured(model).model == pytest.approx(0.5, abs=0.02)


def _decaying_spectrum_linear(out_f=48, in_f=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    weight = u @ torch.diag(0.7 ** torch.arange(out_f, dtype=torch.float32)) @ v[:out_f]
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data.copy_(weight)
    return linear


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_recalibration_on_the_sparse_model_removes_the_drift_of_dense_thresholds(arch):
    drift = {}
    for recalibrate in (False, True):
        config = asp.RSparseConfig(sparsity=0.5, alpha=0.8, recalibrate=recalibrate)
        drift[recalibrate] = abs(measured(asp.sparsify_(tiny_model(arch), config, CALIB)).model - 0.5)
    assert drift[True] < drift[False]


def test_low_rank_path_beats_plain_masking_at_equal_reads_on_a_low_rank_weight():
    linear = _decaying_spectrum_linear()
    x = torch.randn(256, 64)
    errors = {}
    for alpha in (1.0, 0.7):
        channel_sparsity, rank = rsparse_budget(64, 48, 0.5, alpha)
        sparse = SparseLinear.from_linear(linear)
        sparse.set_topk(round(64 * (1 - channel_sparsity)), 0.5)
        if rank:
            sparse.set_lowrank(*svd_factors(linear.weight, rank))
        errors[alpha] = (sparse(x) - linear(x)).pow(2).mean().item()
    assert errors[0.7] < 0.5 * errors[1.0]


def test_dropped_factors_are_optimal_for_the_dropped_channels():
    torch.manual_seed(0)
    weight = torch.randn(40, 32)
    x_d = (torch.randn(2000, 6) @ torch.randn(6, 32)) * (torch.rand(2000, 32) < 0.5)  # structured, masked
    cov = (x_d.T.double() @ x_d.double()) / x_d.shape[0]
    residual = {}
    for name, (a, b) in (("svd", svd_factors(weight, 4)), ("dropped", dropped_factors(weight, cov, 4))):
        residual[name] = (x_d @ weight.T - (x_d @ a.T) @ b.T).pow(2).mean().item()
    assert residual["dropped"] < 0.8 * residual["svd"]


def test_dropped_low_rank_installs_and_reaches_target():
    model = asp.sparsify_(tiny_model("llama"), asp.RSparseConfig(sparsity=0.5, alpha=0.8, lowrank="dropped"), CALIB)
    assert all(m.rank > 0 for m in model.modules() if isinstance(m, SparseLinear))
    assert measured(model).model == pytest.approx(0.5, abs=0.02)


def test_role_coefficients_keep_the_model_budget():
    config = asp.RSparseConfig(sparsity=0.4, role_coefficients=(("down", 1.3), ("q", 0.5)))
    model = asp.sparsify_(tiny_model("llama"), config, CALIB)
    linears = [m for m in model.modules() if isinstance(m, SparseLinear)]
    total = sum(m.weight.numel() for m in linears)
    assert sum(m.target * m.weight.numel() for m in linears) / total == pytest.approx(0.4, abs=1e-9)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.target / layer.mlp.up_proj.target == pytest.approx(1.3)
    assert layer.self_attn.q_proj.target / layer.mlp.up_proj.target == pytest.approx(0.5)


def test_budget_scaled_caps_and_refuses_the_unreachable():
    sizes = {"a": 1, "b": 3}
    out = budget_scaled(sizes, {"a": 4.0, "b": 1.0}, 0.6, cap=0.9)
    assert out["a"] == 0.9 and (out["a"] + 3 * out["b"]) / 4 == pytest.approx(0.6)
    with pytest.raises(ActSparseError, match="cannot be reached"):
        budget_scaled(sizes, {"a": 1.0, "b": 1.0}, 0.96)


def test_evolve_is_seeded_and_never_worse_than_its_start():
    target = [3, -1, 2, 0, 1]
    fitness = lambda g: sum((x - t) ** 2 for x, t in zip(g, target))
    runs = [evolve(fitness, [0] * 5, [(-3, 3)] * 5, 6, 8, seed=7) for _ in range(2)]
    assert runs[0].genes == runs[1].genes and runs[0].history == runs[1].history
    assert runs[0].loss < runs[0].start_loss == fitness([0] * 5)
    assert runs[0].history == sorted(runs[0].history, reverse=True)


@pytest.mark.parametrize("over,allocation,fitness", [
    ("alpha", "search", "loss"), ("alpha+sparsity", "search", "loss"), ("alpha+sparsity", "greedy+search", "loss"),
    ("alpha+sparsity", "greedy+search", "kl"),
])
def test_search_is_deterministic_keeps_the_budget_and_is_saved(tmp_path, over, allocation, fitness):
    fields = {**SEARCH, "allocation": allocation, "greedy_tokens": 48, "search_fitness": fitness}
    config = asp.RSparseConfig(sparsity=0.5, alpha=0.8, search_over=over, search_seed=3, **fields)
    first = asp.sparsify_(tiny_model("llama"), config, CALIB)
    second = asp.sparsify_(tiny_model("llama"), config, CALIB)
    assert first.actsparse_recipe == second.actsparse_recipe
    assert torch.equal(logits(first), logits(second))
    search = first.actsparse_recipe["search"]
    assert search["loss"] <= search["start_loss"] and search["fitness"] == fitness
    linears = [m for m in first.modules() if isinstance(m, SparseLinear)]
    total = sum(m.weight.numel() for m in linears)
    assert sum(m.target * m.weight.numel() for m in linears) / total == pytest.approx(0.5, abs=1e-6)
    assert measured(first).model == pytest.approx(0.5, abs=0.03)
    save(first, tmp_path / "out")
    loaded, _ = load(tmp_path / "out")
    assert loaded.actsparse_recipe["search"] == search
    assert torch.equal(logits(loaded), logits(first))


@pytest.mark.parametrize("arch,shared", [("llama", False), ("phi3", False), ("gemma3", False), ("llama", True)])
def test_save_load_gives_identical_logits(tmp_path, arch, shared):
    config = asp.RSparseConfig(sparsity=0.5, alpha=0.7, shared_selection=shared)
    model = asp.sparsify_(tiny_model(arch), config, CALIB)
    save(model, tmp_path / "out")
    loaded, _ = load(tmp_path / "out")
    assert loaded.actsparse_config == model.actsparse_config
    assert [m.rank for m in loaded.modules() if isinstance(m, SparseLinear)] == \
        [m.rank for m in model.modules() if isinstance(m, SparseLinear)]
    assert torch.equal(logits(loaded), logits(model))
    if shared:  # the groups select as one again after loading
        attn = loaded.model.layers[0].self_attn
        assert same_selection(attn.q_proj, attn.k_proj) and same_selection(attn.q_proj, attn.v_proj)


def test_kl_fitness_is_the_sparse_models_divergence_from_its_dense_self():
    model = asp.sparsify_(tiny_model("llama"), asp.RSparseConfig(sparsity=0.5, alpha=0.8), CALIB)
    windows = CALIB[:2]
    with dense_baseline(model):
        dense = log_probs(model, windows)
        assert kl_from(model, windows, dense) == 0.0
    with torch.no_grad():
        sparse = F.log_softmax(model(input_ids=windows).logits.float(), -1)
    by_hand = (dense[0].exp() * (dense[0] - sparse[0])).sum() + (dense[1].exp() * (dense[1] - sparse[1])).sum()
    assert kl_from(model, windows, dense) == pytest.approx(by_hand.item() / (2 * windows.shape[1]), rel=1e-4)
    assert kl_from(model, windows, dense) > 0


@pytest.mark.parametrize("fitness", ["loss", "kl"])
def test_the_searched_models_fitness_is_the_one_the_search_reports(fitness):
    config = asp.RSparseConfig(sparsity=0.5, alpha=0.8, search_fitness=fitness, **SEARCH)
    model = asp.sparsify_(tiny_model("llama"), config, CALIB)
    windows = CALIB[: SEARCH["search_windows"]]
    with dense_baseline(model):
        dense = log_probs(model, windows)
    measured_fitness = kl_from(model, windows, dense) if fitness == "kl" else lm_loss(model, windows)
    assert model.actsparse_recipe["search"]["loss"] == pytest.approx(measured_fitness, rel=1e-6)


def test_greedy_search_starts_from_the_greedy_allocation():
    # alpha 0.5, the search's lowest: both runs take factors of the same largest rank (here the
    # exact SVD), so the greedy steps of both see the same low-rank paths
    greedy = asp.sparsify_(tiny_model("llama"), asp.RSparseConfig(sparsity=0.5, alpha=0.5, allocation="greedy",
                                                                   greedy_tokens=48), CALIB)
    config = asp.RSparseConfig(sparsity=0.5, alpha=0.5, greedy_tokens=48, search_over="alpha",
                               **{**SEARCH, "allocation": "greedy+search"})
    searched = asp.sparsify_(tiny_model("llama"), config, CALIB)
    # Searching alpha alone leaves each linear's sparsity where the greedy allocation put it.
    assert searched.actsparse_recipe["allocation"] == greedy.actsparse_recipe["allocation"]
    assert len(set(greedy.actsparse_recipe["allocation"].values())) > 1


@pytest.mark.parametrize("bad,match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(score="l1"), "score"),
    (dict(allocation="evolutionary"), "allocation"), (dict(search_over="rank"), "search_over"),
    (dict(search_fitness="ce"), "search_fitness must be one of loss, kl, got 'ce'"),
    (dict(role_coefficients=(("ffn", 1.2),)), "role"), (dict(role_coefficients=(("down", 0.0),)), "down"),
    (dict(search_generations=0), "search_generations"), (dict(lowrank="qr"), "lowrank"),
])
def test_bad_config_values_are_named(bad, match):
    with pytest.raises(ActSparseError, match=match):
        asp.RSparseConfig(sparsity=0.5, **bad)


def test_config_round_trips_through_json():
    config = asp.RSparseConfig(sparsity=0.4, alpha=0.85, role_coefficients=(("down", 1.2),), allocation="search")
    assert asp.config_from_dict(config.to_dict()) == config


def test_cli_sparsify_with_search_then_eval(tmp_path, model_dir):
    import json

    from actsparse.cli import main
    from tiny import random_text

    out, calib = tmp_path / "sparse", tmp_path / "calib.txt"
    calib.write_text(random_text(800, seed=1))
    args = [str(model_dir), "--method", "rsparse", "--sparsity", "0.5", "--calib", str(calib), "--calib-samples", "4",
            "--calib-seq-len", "64", "--allocation", "search", "--option", "search_generations=1",
            "--option", "search_population=2", "--option", "lowrank=\"dropped\""]
    assert main(["sparsify", *args, "-o", str(out)]) == 0
    meta = json.loads((out / "actsparse" / "recipe.json").read_text())
    assert meta["config"]["lowrank"] == "dropped" and meta["recipe"]["search"]["evaluations"] >= 2
    result = tmp_path / "r.json"
    assert main(["eval", str(out), "--ppl", str(calib), "--seq-len", "64", "--json", str(result)]) == 0
    assert json.loads(result.read_text())["sparsity"]["model"] == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
def test_randomized_svd_factors_are_as_good_as_the_exact_truncation(spectrum):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(384, 1024, generator=g, dtype=torch.float64)
    if spectrum == "decaying":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        weight = (u * (s * torch.arange(1, 385, dtype=torch.float64) ** -0.7)) @ vh
    rank = 48  # randomized: 2 (48 + 16) < 384
    s = torch.linalg.svdvals(weight)
    optimal = s[rank:].pow(2).sum().sqrt()
    a, b = svd_factors(weight.float(), rank)
    error = (weight - b.double() @ a.double()).norm()
    assert error <= 1.01 * optimal
