"""rsparse-kl: R-Sparse, then the decoder weights tuned to the dense model's next-token distributions."""
import pytest
import torch
import torch.nn.functional as F

import actsparse
from actsparse.errors import ActSparseError
from actsparse.methods import rsparse_kl
from actsparse.methods.rsparse_kl import check_update_fits
from tiny import random_tokens, tiny_model

FAST = dict(allocation="uniform", alpha=0.9)  # the R-Sparse part kept quick; the tune is what is tested


def _kl(dense, sparse, ids):
    with torch.no_grad():
        p = F.log_softmax(dense(ids).logits.float(), -1)
        q = F.log_softmax(sparse(ids).logits.float(), -1)
    return F.kl_div(q.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean").item()


def _sparsify(config, arch="llama"):
    torch.manual_seed(0)
    return actsparse.sparsify_(tiny_model(arch), config, random_tokens(16, 32, seed=1))


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_the_tune_brings_the_sparse_model_closer_to_dense(arch, rank):
    """On the calibration windows: a random tiny model has nothing to generalise from (held-out
    random tokens do not improve); the embedded model's held-out text does (BENCHMARKS.md)."""
    dense = tiny_model(arch)
    untuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=0, **FAST), arch)
    tuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=40, kl_lr=3e-3 if rank else 3e-4, kl_rank=rank, **FAST), arch)
    calibration = random_tokens(16, 32, seed=1)
    assert _kl(dense, tuned, calibration) < 0.8 * _kl(dense, untuned, calibration)
    recipe = tuned.actsparse_recipe["kl_tune"]
    assert recipe["steps"] == 40 and recipe["rank"] == rank and recipe["kl_last"] < recipe["kl_first"]
    # the update is folded in: plain parameters, the same keys and selection state as R-Sparse's
    assert set(tuned.state_dict()) == set(untuned.state_dict())
    assert all(p.requires_grad for p in tuned.parameters())
    for (name, a), b in zip(tuned.named_modules(), untuned.modules()):
        if isinstance(a, actsparse.nn.SparseLinear):
            assert (a.mode, a.rank, float(a.threshold)) == (b.mode, b.rank, float(b.threshold)), name
            assert not torch.equal(a.weight, b.weight), name


def test_the_tune_under_bf16_autocast_brings_the_fp32_model_closer_to_dense():
    dense = tiny_model("llama")
    untuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=0, **FAST))
    tuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=40, kl_lr=3e-4, kl_autocast=True, **FAST))
    assert tuned.actsparse_recipe["kl_tune"]["autocast"] is True
    assert all(p.dtype == torch.float32 for p in tuned.parameters())
    calibration = random_tokens(16, 32, seed=1)
    assert _kl(dense, tuned, calibration) < 0.8 * _kl(dense, untuned, calibration)


@pytest.mark.parametrize("native", [True, False])
def test_unset_autocast_follows_the_device_and_the_recipe_says_which_ran(monkeypatch, native):
    monkeypatch.setattr(rsparse_kl, "bf16_is_native", lambda device: native)
    tuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=2, **FAST))
    assert tuned.actsparse_recipe["kl_tune"]["autocast"] is native


def test_forced_autocast_where_bf16_is_emulated_warns_and_still_runs(monkeypatch, capsys):
    monkeypatch.setattr(rsparse_kl, "bf16_is_native", lambda device: False)
    tuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=2, kl_autocast=True, **FAST))
    assert tuned.actsparse_recipe["kl_tune"]["autocast"] is True
    assert "kl_autocast=true on cpu, which has no bf16 arithmetic in hardware" in capsys.readouterr().err


def test_bf16_is_native_on_the_cpu_follows_its_instructions():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert rsparse_kl.bf16_is_native(torch.device("cpu")) is expected
    assert rsparse_kl.bf16_is_native(torch.device("meta")) is False


def test_the_cosine_schedule_decays_the_rate_to_zero_and_still_tunes():
    dense = tiny_model("llama")
    untuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=0, **FAST))
    tuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=40, kl_lr=6e-4, kl_schedule="cosine", **FAST))
    recipe = tuned.actsparse_recipe["kl_tune"]
    assert recipe["schedule"] == "cosine" and recipe["lr_last"] < 0.01 * recipe["lr"]
    calibration = random_tokens(16, 32, seed=1)
    assert _kl(dense, tuned, calibration) < 0.8 * _kl(dense, untuned, calibration)


def test_the_rate_ramps_over_the_warmup_then_follows_the_schedule():
    factors = [rsparse_kl.rate_factor(step, 10, "cosine", 4) for step in range(10)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and factors[4] == 1.0
    assert all(a > b for a, b in zip(factors[4:], factors[5:])) and factors[-1] < 0.1
    assert [rsparse_kl.rate_factor(step, 10, "constant", 2) for step in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])


def test_weight_decay_keeps_the_tuned_weights_nearer_the_methods():
    untuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=0, **FAST))

    def moved(**options):
        tuned = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=20, kl_lr=3e-3, **FAST, **options))
        return sum((a - b).norm() ** 2 for a, b in zip(tuned.parameters(), untuned.parameters())) ** 0.5, tuned

    free, _ = moved()
    decayed, tuned = moved(kl_weight_decay=30.0)  # 9% of the update gone each step
    assert decayed < 0.7 * free
    assert tuned.actsparse_recipe["kl_tune"]["weight_decay"] == 30.0


def test_no_steps_is_rsparse_on_the_statistics_windows_with_the_same_options():
    fields = dict(sparsity=0.5, **FAST, search_over="alpha+sparsity", search_fitness="kl", greedy_step=0.1, greedy_tokens=512)
    kl = _sparsify(actsparse.make_config("rsparse-kl", kl_steps=0, statistics_windows=4, **fields))
    torch.manual_seed(0)
    plain = actsparse.sparsify_(tiny_model("llama"), actsparse.RSparseConfig(**fields), random_tokens(16, 32, seed=1)[:4])
    ids = random_tokens(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(kl(ids).logits, plain(ids).logits)


def test_sparsity_zero_is_dense_exactly():
    model = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.0))
    ids = random_tokens(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model("llama")(ids).logits)
    assert model.actsparse_recipe["kl_tune"] == {"steps": 0}


def test_a_tuned_model_saves_and_loads_with_its_weights(tmp_path):
    model = _sparsify(actsparse.make_config("rsparse-kl", sparsity=0.5, kl_steps=5, kl_lr=1e-3, **FAST))
    actsparse.save(model, tmp_path / "m")
    loaded, _ = actsparse.load(tmp_path / "m")
    ids = random_tokens(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.actsparse_config == model.actsparse_config


def test_defaults_are_the_searched_recipe():
    config = actsparse.make_config("rsparse-kl", sparsity=0.4)
    assert isinstance(config, actsparse.RSparseConfig)
    assert (config.allocation, config.search_over, config.search_fitness) == ("greedy+search", "alpha+sparsity", "kl")
    assert (config.score, config.alpha) == ("wina", 1.0)
    assert (config.kl_steps, config.kl_rank, config.statistics_windows, config.kl_autocast) == (200, 0, 16, None)
    assert (config.kl_lr, config.kl_schedule) == (1.2e-4, "cosine")


@pytest.mark.parametrize("field,value,message", [
    ("kl_steps", -1, "kl_steps must be an integer >= 0"), ("kl_rank", 1.5, "kl_rank must be an integer"),
    ("kl_lr", 0.0, r"kl_lr must be in \(0, 1\)"), ("kl_lr", "fast", r"kl_lr"),
    ("statistics_windows", 0, "statistics_windows must be an integer >= 1"),
    ("kl_autocast", "yes", r"kl_autocast must be a boolean \(true/false\)"),
    ("kl_schedule", "linear", "kl_schedule must be one of constant, cosine, got 'linear'"),
    ("kl_warmup", 200, r"kl_warmup must be below kl_steps \(200\), got 200"), ("kl_warmup", -1, "kl_warmup must be an integer >= 0"),
    ("kl_weight_decay", -0.1, "kl_weight_decay must be a number >= 0"),
])
def test_bad_options_are_named(field, value, message):
    with pytest.raises(ActSparseError, match=message):
        actsparse.make_config("rsparse-kl", sparsity=0.4, **{field: value})


def test_a_full_tune_that_cannot_fit_is_refused_before_any_work():
    cpu = torch.device("cpu")
    with pytest.raises(ActSparseError, match=r"kl_rank=0 tunes every decoder weight in full: 104.3 GiB .* set kl_rank"):
        check_update_fits(7_000_000_000, 0, 80 * 2**30, cpu)
    check_update_fits(7_000_000_000, 64, 80 * 2**30, cpu)  # rank 64: a few hundred MB
    check_update_fits(135_000_000, 0, 8 * 2**30, cpu)
    check_update_fits(7_000_000_000, 0, None, cpu)  # unknown free memory: not refused on a guess


def test_the_demo_leaves_the_weight_tuning_method_out():
    from actsparse.commands.demo import training_free_methods

    methods = training_free_methods()
    assert "rsparse-kl" not in methods and {"teal", "wina", "cats", "rsparse", "larosa"} <= set(methods)
