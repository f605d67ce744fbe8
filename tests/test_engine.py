"""The static-KV-cache decode engine: its greedy tokens are the HF forward's argmax, dense and sparse."""
import shutil

import pytest
import torch

import actsparse
from actsparse import engine as engine_module
from actsparse.engine import DecodeEngine
from actsparse.errors import ActSparseError
from actsparse.runtime import use_kernels
from tiny import ARCHS, random_tokens, tiny_model


def _forward_argmax(model, prompt, new):
    """What the model predicts at every generated position, from one full forward (no cache)."""
    sequence = torch.cat([prompt, new], dim=1)
    with torch.no_grad():
        return model(sequence).logits[:, prompt.shape[1] - 1 : -1].argmax(-1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_dense_decode_is_the_forward_argmax(arch):
    model = tiny_model(arch)
    prompt = random_tokens(2, 5, seed=3)
    result = DecodeEngine(model, max_len=24, batch_size=2).generate(prompt, 12)
    assert result.tokens.shape == (2, 12) and result.steps == 11
    assert torch.equal(result.tokens, _forward_argmax(model, prompt, result.tokens))



@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("compile", ["eager", True])
def test_compiled_decode_of_sliding_window_models_is_the_forward_argmax(arch, compile):
    """transformers' sliding cache layers count positions in a Python int, which a compiled step
    froze (wrong tokens on the CPU; on CUDA a recompile inside the graph capture). Within the
    window the engine's cache attends in full (the same attention); beyond it, a compiled engine
    is refused."""
    model = tiny_model(arch)
    prompt = random_tokens(2, 5, seed=3)
    engine = DecodeEngine(model, max_len=24, batch_size=2, compile=compile)
    tokens = engine.generate(prompt, 16).tokens
    assert torch.equal(tokens, _forward_argmax(model, prompt, tokens))
    assert torch.equal(engine.generate(prompt, 16).tokens, tokens)
    window = model.config.sliding_window
    with pytest.raises(ActSparseError, match=rf"max_len {window + 1} is beyond the model's sliding attention window \({window}\).*compile=False and cuda_graph=False"):
        DecodeEngine(model, max_len=window + 1, compile=compile)
    DecodeEngine(model, max_len=window + 1, compile=False)  # eager steps keep the Python count right

def test_warm_up_steps_leave_no_trace():
    """A compiled engine runs warm-up steps (on CUDA before capturing its graph); they advance
    transformers' static cache, which must not shift what the real steps read."""
    model = tiny_model("llama")
    prompt = random_tokens(2, 5, seed=3)
    engine = DecodeEngine(model, max_len=24, batch_size=2, compile="eager")
    first = engine.generate(prompt, 16).tokens
    assert torch.equal(first, _forward_argmax(model, prompt, first))
    assert torch.equal(engine.generate(prompt, 16).tokens, first)


def test_warm_up_fits_a_cache_filled_to_the_last_position():
    """Two new tokens fill the cache: the warm-up steps (one of them not compiled) fit in it."""
    model = tiny_model("llama")
    prompt = random_tokens(1, 5, seed=3)
    tokens = DecodeEngine(model, max_len=7, compile="eager").generate(prompt, 2).tokens
    assert torch.equal(tokens, _forward_argmax(model, prompt, tokens))


@pytest.mark.skipif(shutil.which("g++") is None, reason="the cpu kernels build with g++")
@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_sparse_decode_through_kernels_is_the_sparse_forward_argmax(arch):
    model = tiny_model(arch)
    actsparse.sparsify_(model, actsparse.TealConfig(sparsity=0.5), random_tokens(1, 32))
    engine = DecodeEngine(model, max_len=24)
    prompt = random_tokens(1, 5, seed=4)
    dense_like = engine.generate(prompt, 10).tokens  # torch reference modules
    use_kernels(model)
    engine.invalidate()
    sparse = engine.generate(prompt, 10).tokens
    use_kernels(model, False)
    assert torch.equal(sparse, dense_like)
    assert torch.equal(sparse, _forward_argmax(model, prompt, sparse))


@pytest.mark.parametrize("compile", ["eager", True])
def test_a_given_text_is_fed_instead_of_the_argmax(compile):
    """`generate(..., text=)` decodes the text's tokens (the argmax is still computed, then
    replaced), and the next greedy decode is the model's own again."""
    model = tiny_model("llama")
    prompt, text = random_tokens(2, 5, seed=3), random_tokens(2, 12, seed=5)
    engine = DecodeEngine(model, max_len=24, batch_size=2, compile=compile)
    greedy = engine.generate(prompt, 12).tokens
    assert not torch.equal(greedy, text)
    assert torch.equal(engine.generate(prompt, 12, text).tokens, text)
    assert torch.equal(engine.generate(prompt, 8, text).tokens, text[:, :8])
    assert torch.equal(engine.generate(prompt, 12).tokens, greedy)
    assert torch.equal(engine.generate(prompt, 12, greedy).tokens, greedy)
    with pytest.raises(ActSparseError, match=r"text must be \[2, >= 12\]"):
        engine.generate(prompt, 12, text[:, :11])
    with pytest.raises(ActSparseError, match="text must be"):
        engine.generate(prompt, 4, text[:1])


def test_engine_reuse_and_limits():
    model = tiny_model("llama")
    engine = DecodeEngine(model, max_len=16)
    first = engine.generate(random_tokens(1, 4, seed=1), 8).tokens
    engine.generate(random_tokens(1, 6, seed=2), 10)  # another prompt in between
    assert torch.equal(engine.generate(random_tokens(1, 4, seed=1), 8).tokens, first)
    with pytest.raises(ActSparseError, match="max_len"):
        engine.generate(random_tokens(1, 10, seed=1), 8)
    with pytest.raises(ActSparseError, match=r"\[1, L\]"):
        engine.generate(random_tokens(2, 4, seed=1), 4)
    with pytest.raises(ActSparseError, match="CUDA"):
        DecodeEngine(model, max_len=16, cuda_graph=True)
    assert not engine.dependent_launch  # a CPU model: off by default
    with pytest.raises(ActSparseError, match="dependent launch needs a CUDA model"):
        DecodeEngine(model, max_len=16, dependent_launch=True)
    with pytest.raises(ActSparseError, match="tokens >= 2"):
        engine.tune(random_tokens(1, 4, seed=1), tokens=1)
    assert engine.tune(random_tokens(1, 4, seed=1), tokens=3) == {}  # the CPU: nothing tuned
    with pytest.raises(ActSparseError, match="inductor_options need the inductor backend"):
        DecodeEngine(model, max_len=16, compile="eager", inductor_options={"combo_kernels": True})


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--sparsity", "1.5"], "--sparsity must be in"),
        (["bench", "--batch", "9"], "--batch must be 1..8"),
        (["bench", "--tokens", "4"], "--tokens must be at least 8"),
        (["bench", "some/model", "--shape", "llama3-8b"], "not both"),
        (["bench", "--tune-budget-s", "-1"], "--tune-budget-s must be a number of seconds >= 0"),
        (["bench", "--tune-budget-s", "nan"], "--tune-budget-s must be a number of seconds >= 0"),
    ],
)
def test_bench_rejects_bad_input(argv, message, capsys):
    from actsparse.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="the cpu kernels build with g++")
@pytest.mark.long
def test_bench_on_a_random_smollm2_shape(tmp_path, capsys):
    import json

    from actsparse.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "smollm2-135m", "--tokens", "8", "--repeats", "1", "--quick-compile", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "teal" and result["config"]["selection"] == "threshold" and result["sparsify_s"] > 0
    for key in ("dense_tok_s", "sparse_tok_s", "speedup", "ideal_speedup", "sparsity", "device", "dtype", "batch"):
        assert key in result
    assert result["device"] == "cpu" and result["batch"] == 1 and 0.4 < result["sparsity"] < 0.6
    assert result["decode"] == "text"  # random tokens fed to both paths: a random-weight shape has no text
    assert result["decode_attention"] is True and result["dependent_launch"] is False  # the latter CUDA only
    assert result["dense_untuned_in_step"] == result["sparse_untuned_in_step"] == []  # the CPU tunes nothing
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="the cpu kernels build with g++")
def test_bench_on_a_saved_prosparse_directory_keeps_its_method(tmp_path, capsys):
    import json

    from actsparse.cli import main
    from tiny import saved_tiny_llama

    relu = tmp_path / "relu"
    assert main(["sparsify", str(saved_tiny_llama(tmp_path / "tiny")), "--method", "prosparse", "--sparsity", "0",
                 "-o", str(relu)]) == 0
    assert main(["bench", str(relu), "--sparsity", "0.5"]) == 2
    assert "already sparsified" in capsys.readouterr().err
    assert main(["bench", str(relu), "--selection", "topk", "--option", "alpha=0.8"]) == 2
    assert "--selection and --option apply to a dense model only" in capsys.readouterr().err
    out = tmp_path / "bench.json"
    assert main(["bench", str(relu), "--tokens", "8", "--repeats", "1", "--decode", "greedy", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "prosparse" and result["target_sparsity"] == 0.0 and result["decode"] == "greedy"
    assert 0.1 < result["sparsity"] < 0.4  # measured: the target is 0, the random ReLU gate zeroes ~half the MLP inputs


@pytest.mark.skipif(shutil.which("g++") is None, reason="the cpu kernels build with g++")
@pytest.mark.parametrize("method, options", [("cats", []), ("larosa", []), ("rsparse", ["--option", "alpha=0.8"]), ("wina", [])])
def test_bench_sparsifies_with_any_method(tmp_path, method, options):
    """`bench MODEL --method M` decodes the state `sparsify_` makes: the measured sparsity is M's."""
    import json

    from actsparse.cli import main
    from tiny import saved_tiny_llama

    out = tmp_path / "bench.json"
    assert main(["bench", str(saved_tiny_llama(tmp_path / "tiny")), "--method", method, "--sparsity", "0.5", *options,
                 "--tokens", "8", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == method and result["target_sparsity"] == 0.5 and result["sparsify_s"] > 0
    if method == "cats":  # the target is the MLP's sparsity; the model-level share is lower
        assert result["target_kind"] == "mlp" and 0.1 < result["sparsity"] < 0.5
        assert result["measured_target"] == result["sparsity_mlp"] == pytest.approx(0.5, abs=0.1)
    else:
        assert result["target_kind"] == "model" and result["measured_target"] == result["sparsity"]
        assert result["sparsity"] == pytest.approx(0.5, abs=0.1)
    if method == "larosa":
        assert result["rotation_reads"] > 0 and result["ideal_speedup"] < 1 / (1 - result["sparsified_byte_fraction"] * result["sparsity"])


@pytest.mark.parametrize("method", ["teal", "cats", "rsparse", "larosa"])
def test_dense_baseline_is_dense_and_restores_the_sparse_state(method):
    from actsparse import make_config, sparsify_
    from actsparse.nn import dense_baseline
    from tiny import CALIB

    torch.manual_seed(0)
    dense, sparse = tiny_model("llama"), tiny_model("llama")
    config = make_config(method, sparsity=0.5)
    sparsify_(sparse, config, CALIB)
    ids = random_tokens(2, 12, seed=5)
    with torch.no_grad():
        before = sparse(ids).logits
        with dense_baseline(sparse):
            baseline = sparse(ids).logits
        after = sparse(ids).logits
        reference = dense(ids).logits
    assert torch.equal(after, before)
    assert not torch.allclose(baseline, before)
    if method == "larosa":  # rotated weights: dense up to the fold's rounding
        torch.testing.assert_close(baseline, reference, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(baseline, reference)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the cpu kernels build with g++")
def test_bench_with_topk_selection_keeps_exactly_k(tmp_path):
    import json

    from actsparse.cli import main
    from tiny import saved_tiny_llama

    out = tmp_path / "bench.json"
    assert main(["bench", str(saved_tiny_llama(tmp_path / "tiny")), "--selection", "topk", "--sparsity", "0.5",
                 "--tokens", "8", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["selection"] == "topk" and result["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_bench_refuses_a_shape_the_device_cannot_hold_before_building_it(monkeypatch, capsys):
    import time

    from actsparse import speed
    from actsparse.cli import main

    monkeypatch.setattr(speed, "available_bytes", lambda device: 2**30)
    started = time.perf_counter()
    assert main(["bench", "--shape", "llama3-8b", "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "--shape llama3-8b in bfloat16 needs about 16.5 GiB on cpu; 1.0 GiB is free" in err
    assert time.perf_counter() - started < 5


@pytest.fixture(params=[True, False], ids=["own-cache", "shared-cache"])
def compile_isolation(request, monkeypatch):
    """Both ways the engine compiles: its own cache without guards (torch >= 2.13), and the shared
    cache with guards (older torch, as on the lent GPU)."""
    if request.param and not engine_module._COMPILE_ISOLATES:
        pytest.skip("this torch has no isolate_recompiles")
    monkeypatch.setattr(engine_module, "_COMPILE_ISOLATES", request.param)
    return request.param


def test_compiled_cpu_step_follows_the_model_after_invalidate(compile_isolation):
    """The compiled CPU step runs without guard evaluation: `invalidate` compiles it again (with
    guards, the changed model fails them and the step compiles again)."""
    model = tiny_model("llama")
    prompt = random_tokens(1, 5, seed=3)
    engine = DecodeEngine(model, max_len=24, compile="eager")
    dense = engine.generate(prompt, 12).tokens
    actsparse.sparsify_(model, actsparse.TealConfig(sparsity=0.9), random_tokens(1, 32))
    engine.invalidate()
    sparse = engine.generate(prompt, 12).tokens
    assert torch.equal(sparse, _forward_argmax(model, prompt, sparse))
    assert not torch.equal(sparse, dense)


def test_compiled_engines_side_by_side_each_run_their_own_model(compile_isolation):
    """Each engine compiles its own copy of the step, so engines of several models in one process
    (as `bench` makes) never run each other's compiled code."""
    models = [tiny_model("llama"), tiny_model("llama")]
    actsparse.sparsify_(models[1], actsparse.TealConfig(sparsity=0.9), random_tokens(1, 32))
    prompt = random_tokens(1, 5, seed=8)
    engines = [DecodeEngine(m, max_len=24, compile="eager") for m in models]
    for _ in range(2):
        for model, engine in zip(models, engines):
            tokens = engine.generate(prompt, 10).tokens
            assert torch.equal(tokens, _forward_argmax(model, prompt, tokens))


def _tiny_teal_through_kernels():
    model = tiny_model("llama")
    actsparse.sparsify_(model, actsparse.TealConfig(sparsity=0.5), random_tokens(1, 32))
    use_kernels(model)
    return model


@pytest.mark.skipif(shutil.which("g++") is None, reason="the cpu kernels build with g++")
def test_cpu_step_profile_splits_a_step_by_where_its_time_goes():
    from actsparse.speed import cpu_step_profile

    model = _tiny_teal_through_kernels()
    prompt = random_tokens(1, 5, seed=2)
    engine = DecodeEngine(model, max_len=24, compile="eager")
    engine.generate(prompt, 4)
    profile = cpu_step_profile(engine, prompt, steps=8)
    parts = profile["parts"]
    for part in ("linear kernels", "LM head", "attention kernel"):
        assert parts[part] > 0, part
    assert abs(profile["us_per_step"] - sum(parts.values())) < 1e-6 * profile["us_per_step"]
    with pytest.raises(ActSparseError, match="compile=True"):
        cpu_step_profile(DecodeEngine(model, max_len=24), prompt, steps=2)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the cpu kernels build with g++")
def test_cpu_step_compiles_with_the_cpp_wrapper_by_default_and_decodes_as_the_python_wrapper():
    from actsparse.engine import CPU_INDUCTOR_OPTIONS

    model = _tiny_teal_through_kernels()
    prompt = random_tokens(1, 5, seed=4)
    default = DecodeEngine(model, max_len=24, compile=True)
    assert default._compile_options["options"] == CPU_INDUCTOR_OPTIONS == {
        "cpp_wrapper": True, "size_asserts": False, "cpp_wrapper_build_separate": True}
    python_wrapper = DecodeEngine(model, max_len=24, compile=True, inductor_options={})
    assert python_wrapper._compile_options["options"] is None
    tokens = default.generate(prompt, 12).tokens
    assert torch.equal(tokens, python_wrapper.generate(prompt, 12).tokens)
    assert torch.equal(tokens, _forward_argmax(model, prompt, tokens))
