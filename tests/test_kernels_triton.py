"""The Triton kernels against the torch reference, run by the Triton interpreter on CPU tensors.

The interpreter's bf16 `tl.dot` is wrong (triton 3.9: garbage results for bf16 operands), so bf16
batches through `tl.dot` (`GemvConfig.dot`, and the output-sparse rows kernel) are checked on the
GPU by benchmarks/gpu_matrix.py; the CUDA-core batch tiles run here in every dtype.
"""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("these tests run the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import actsparse  # noqa: E402
from actsparse.kernels import batching, cpu_ops, ops as op_defs, triton_ops as ops, tuning  # noqa: E402
from actsparse.nn import packing  # noqa: E402
from actsparse.runtime import use_kernels  # noqa: E402
from actsparse import TealConfig, sparsify_  # noqa: E402
from actsparse.errors import ActSparseError  # noqa: E402
from tiny import random_tokens, tiny_model  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
CONFIGS = {
    "compact": ops.GemvConfig(32, 16, 1, 4, 1),
    "compact-split-k": ops.GemvConfig(64, 32, 3, 4, 1),
    "masked-split-k": ops.GemvConfig(32, 16, 3, 4, 1, compact=False),
    "pipelined": ops.GemvConfig(32, 16, 1, 4, 1, pipelined=True),
    "pipelined-split-k": ops.GemvConfig(64, 32, 3, 4, 1, pipelined=True),
    "dot-compact-split-k": ops.GemvConfig(64, 32, 3, 4, 1, dot=True),
    "dot-masked": ops.GemvConfig(32, 16, 1, 4, 1, compact=False, dot=True),
}


@pytest.fixture(autouse=True, scope="module")
def triton_kernels_on_cpu():
    """The Triton kernels as the ops' CPU kernels (the interpreter runs them on CPU tensors), the
    C++ ones set aside meanwhile."""
    cpu_ops.unregister()
    ops.register("cpu")
    yield
    cpu_ops.register()


def _skip_interpreter_bf16_dot(dtype, batch, dot=True):
    if dtype == torch.bfloat16 and batch > 1 and dot:
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong; covered on the GPU")


def _threshold(x, sparsity):
    return torch.tensor(-1.0 if sparsity == 0 else float(x.abs().float().quantile(sparsity)))


def _reference(x, wt, t, scale=None, bias=None, lrb=None, lrz=None):
    score = x.abs().float() * (scale if scale is not None else 1.0)
    y = torch.where(score > t, x, torch.zeros((), dtype=x.dtype)).double() @ wt.double()
    if bias is not None:
        y += bias.double()
    if lrb is not None:
        y += lrz.double() @ lrb.double().T
    return y


def _rel(out, ref):
    assert torch.isfinite(out).all(), "an output element was not written"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _teal_half(arch):
    """A tiny model with TEAL thresholds at 50% from its own activations."""
    model = tiny_model(arch)
    return sparsify_(model, TealConfig(sparsity=0.5), random_tokens(2, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_input_sparse_matches_reference(dtype, batch, sparsity, cfg):
    _skip_interpreter_bf16_dot(dtype, batch, cfg.dot)
    torch.manual_seed(0)
    k, n = 100, 70  # not multiples of any block
    x = torch.randn(batch, k).to(dtype)
    wt = torch.randn(k, n).to(dtype)
    t = _threshold(x, sparsity)
    y = torch.full((batch, n), float("nan"), dtype=dtype)
    ops.launch_input_sparse(x, wt, t, None, None, None, None, cfg, y)
    assert _rel(y, _reference(x, wt, t)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("cfg", [CONFIGS[n] for n in ("compact-split-k", "masked-split-k", "pipelined-split-k", "dot-compact-split-k")],
                         ids=["compact", "masked", "pipelined", "dot"])
def test_input_sparse_scale_bias_lowrank(dtype, batch, cfg):
    _skip_interpreter_bf16_dot(dtype, batch, cfg.dot)
    torch.manual_seed(1)
    k, n, r = 67, 45, 5
    x = torch.randn(batch, k).to(dtype)
    wt = torch.randn(k, n).to(dtype)
    scale = torch.rand(k) + 0.5
    bias = torch.randn(n).to(dtype)
    lrb, lrz = torch.randn(n, r).to(dtype), torch.randn(batch, r).to(dtype)
    t = _threshold(x, 0.5)
    y = torch.full((batch, n), float("nan"), dtype=dtype)
    ops.launch_input_sparse(x, wt, t, scale, bias, lrb, lrz, cfg, y)
    assert _rel(y, _reference(x, wt, t, scale, bias, lrb, lrz)) < TOL[dtype]


@pytest.mark.parametrize("split", [1, 3])
def test_lowrank_term_summed_over_several_rank_chunks(split):
    # 1024-column blocks take 8 ranks a chunk at batch 1 (the tile's register bound): 20 take three
    torch.manual_seed(5)
    k, n, r = 67, 45, 20
    x, wt, scale = torch.randn(1, k), torch.randn(k, n), torch.rand(k) + 0.5
    lrb, lrz = torch.randn(n, r), torch.randn(1, r)
    t = _threshold(x, 0.5)
    y = torch.full((1, n), float("nan"))
    ops.launch_input_sparse(x, wt, t, scale, None, lrb, lrz, ops.GemvConfig(1024, 16, split, 4, 1), y)
    assert _rel(y, _reference(x, wt, t, scale, None, lrb, lrz)) < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("compact,pipelined", [(True, False), (False, False), (True, True)])
def test_split_k_reduction_in_several_chunks(batch, compact, pipelined):
    torch.manual_seed(4)
    cfg = ops.GemvConfig(1024, 16, 24, 4, 1, compact, pipelined)  # 13 splits: partials summed 2 at a time at batch 3
    for _ in range(2):  # the second launch relies on the first leaving the counters at zero
        x, wt = torch.randn(batch, 400), torch.randn(400, 1200)
        t = _threshold(x, 0.5)
        y = torch.full((batch, 1200), float("nan"))
        ops.launch_input_sparse(x, wt, t, None, None, None, None, cfg, y)
        assert _rel(y, _reference(x, wt, t)) < 1e-5


def test_spread_reduction_is_refused_for_batches_and_slices_that_split_gate_up_groups():
    # The spread sums spin until every program of a column block has arrived, which the
    # interpreter (one program at a time) cannot run: they are checked on the GPU by
    # benchmarks/gpu_matrix.py's check section; here only the refusals (3 splits of 64 columns:
    # slices of 32, less than a gate and an up group of 32).
    cfg = ops.GemvConfig(64, 32, 3, 4, 1, spread=True)
    x, wt = torch.randn(3, 100), torch.randn(100, 128)
    with pytest.raises(ValueError, match="spread"):
        ops.launch_input_sparse(x, wt, torch.tensor(0.5), None, None, None, None, cfg, torch.empty(3, 128))
    with pytest.raises(ValueError, match="spread"):
        ops.launch_input_sparse(x[:1], wt, torch.tensor(0.5), None, None, None, None, cfg, torch.empty(1, 64), "silu", 32)


def test_tuner_skips_unlaunchable_candidates():
    def seconds(cfg):
        if cfg == "too big":
            raise tuning.Unlaunchable("the grid does not fit")
        return {"slow": 2.0, "fast": 1.0}[cfg]

    best, timings = tuning.fastest("key", ["slow", "too big", "fast"], seconds)
    assert best == "fast"
    assert timings == [("slow", 2.0), ("too big", float("inf")), ("fast", 1.0)]
    with pytest.raises(tuning.Unlaunchable, match="none of the 1 candidates"):
        tuning.fastest("key", ["too big"], seconds)


@pytest.fixture()
def fresh_tuner():
    """The tuner's tables emptied for the test, then given back what other tests left in them."""
    saved = [dict(t) for t in (tuning._CHOICES, tuning._TIMINGS, tuning._LOADED)]
    tuning.clear()
    yield
    tuning.clear()
    for table, items in zip((tuning._CHOICES, tuning._TIMINGS, tuning._LOADED), saved):
        table.update(items)


def test_recordings_nest_even_when_they_met_the_same_keys():
    # the engine records its decode inside methods_gpu's recording of the same keys: equal dicts
    with tuning.recording() as outer:
        with tuning.recording() as inner:
            tuning.choose(("nested-test",), ["a", "b"], lambda cfg: None, torch.device("cpu"))
        assert inner == outer == {("nested-test",): 1}
        tuning.choose(("nested-test",), ["a", "b"], lambda cfg: None, torch.device("cpu"))
    assert outer == {("nested-test",): 2} and inner == {("nested-test",): 1}
    assert tuning._RECORDERS == []


def test_tuning_cache_round_trips_and_a_loaded_choice_is_taken_untimed(tmp_path, fresh_tuner):
    small, big = ops.GemvConfig(512, 16, 2, 4, 3), ops.GemvConfig(1024, 8, 2, 4, 3)
    key = ("gemv", 4096, 14336, 1, torch.bfloat16, True, (torch.bool, (True, False)), None, 2)
    tuning._CHOICES[key] = big
    tuning._TIMINGS[key] = [(small, 2e-5), (big, 1e-5), (ops.GemvConfig(64, 8, 1, 1, 1), float("inf"))]
    assert tuning.save(tmp_path / "tuning.json", device_name="NVIDIA H200") == 1
    tuning.clear()
    assert tuning.load(tmp_path / "tuning.json", device_name="NVIDIA H200") == 1

    def untimed(cfg):
        raise AssertionError("a loaded key must not be timed")

    assert tuning.choose(key, [small, big], untimed, torch.device("cuda")) == big
    assert tuning.ranked(key, 3) == [big, small]
    # a choice the kernel no longer offers is tuned again (here: the one candidate, untimed)
    tuning.clear()
    tuning.load(tmp_path / "tuning.json", device_name="NVIDIA H200")
    assert tuning.choose(key, [small], untimed, torch.device("cuda")) == small
    # keys loaded but not met are written again with the new ones
    tuning._CHOICES[("other",)] = small
    tuning._TIMINGS[("other",)] = [(small, 1e-6)]
    tuning._LOADED.pop(key)
    tuning.load(tmp_path / "tuning.json", device_name="NVIDIA H200")
    assert tuning.save(tmp_path / "again.json", device_name="NVIDIA H200") == 2


def test_tuning_cache_of_another_gpu_or_not_a_cache_is_refused(tmp_path, fresh_tuner):
    tuning._CHOICES[("k",)] = ops.GemvConfig(512, 16, 2, 4, 3)
    tuning.save(tmp_path / "tuning.json", device_name="NVIDIA H100 80GB HBM3")
    with pytest.raises(ActSparseError, match="tuned for .*H100.*this is .*H200"):
        tuning.load(tmp_path / "tuning.json", device_name="NVIDIA H200")
    (tmp_path / "bad.json").write_text('{"format": 1}')
    with pytest.raises(ActSparseError, match="bad.json: not a tuning cache"):
        tuning.load(tmp_path / "bad.json", device_name="NVIDIA H200")
    entry = {"key": json.dumps(["gemv", {"dtype": "no_such_dtype"}]), "chosen": "c", "timings": []}
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "device": "NVIDIA H200", "triton": "3", "entries": [entry]}))
    with pytest.raises(ActSparseError, match="bad.json: not a tuning cache.*no_such_dtype"):
        tuning.load(tmp_path / "bad.json", device_name="NVIDIA H200")
    assert tuning._LOADED == {}


def test_input_sparse_op_skips_nothing_at_zero_sparsity_and_everything_above_max():
    torch.manual_seed(2)
    x, wt = torch.randn(2, 40), torch.randn(40, 24)
    dense = ops.input_sparse_linear(x, wt, torch.tensor(float("-inf")), None, None, None, None, 0.0)
    assert _rel(dense, x.double() @ wt.double()) < 1e-5
    none = ops.input_sparse_linear(x, wt, torch.tensor(1e9), None, None, None, None, 1.0)
    assert torch.equal(none, torch.zeros_like(none))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_output_sparse_rows_matches_reference(dtype, batch, sparsity):
    _skip_interpreter_bf16_dot(dtype, batch)
    torch.manual_seed(3)
    j, d = 70, 100
    x, a, w = torch.randn(batch, d).to(dtype), torch.randn(batch, j).to(dtype), torch.randn(j, d).to(dtype)
    t = _threshold(a, sparsity)
    m = torch.full((batch, j), float("nan"), dtype=dtype)
    ops.launch_output_sparse_rows(x, a, t, w, ops.rows_candidates(batch, x.device)[0], m)
    u = (x.double() @ w.double().T).to(dtype)
    ref = torch.where(a.abs().float() > t, a, torch.zeros((), dtype=dtype)).double() * u.double()
    assert _rel(m, ref) < TOL[dtype]
    assert torch.equal(m == 0, ref == 0) or sparsity == 0.0  # masked rows are exact zeros


ACTS = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
}


def test_interleaved_gate_up_splits_back():
    gate_t, up_t = torch.randn(5, 96), torch.randn(5, 96)
    group = packing.gate_up_group(96)
    packed = packing.interleave_gate_up(gate_t, up_t, group)
    assert group == 32 and torch.equal(packed[:, 32:64], up_t[:, :32]) and torch.equal(packed[:, 64:96], gate_t[:, 32:64])
    g, u = packing.split_gate_up(packed, group)
    assert torch.equal(g, gate_t) and torch.equal(u, up_t)
    assert packing.gate_up_group(100) == 100  # no power of two from 16 divides it: one group, [gate | up]


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("cfg", [CONFIGS[n] for n in ("compact", "pipelined-split-k", "masked-split-k")], ids=["compact", "pipelined", "masked"])
def test_gated_op_returns_act_gate_times_up(act, dtype, sparsity, cfg):
    torch.manual_seed(9)
    k, j, group = 70, 96, 16
    x = torch.randn(1, k).to(dtype)
    gate_t, up_t = (torch.randn(k, j) / 4).to(dtype), (torch.randn(k, j) / 4).to(dtype)
    bias = torch.randn(2 * j).to(dtype)
    t = _threshold(x, sparsity)
    packed = packing.interleave_gate_up(gate_t, up_t, group)
    m = torch.full((1, j), float("nan"), dtype=dtype)
    ops.launch_input_sparse(x, packed, t, None, bias, None, None, replace(cfg, bn=4 * group), m, act, group)
    kept = torch.where(x.abs().float() > t, x, torch.zeros((), dtype=dtype))
    gu = (kept.double() @ packed.double() + bias.double()).to(dtype)
    g, u = packing.split_gate_up(gu, group)
    reference = (ACTS[act](g.float()).to(dtype) * u).double()
    assert _rel(m, reference) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [CONFIGS[n] for n in ("compact", "pipelined-split-k", "masked-split-k")], ids=["compact", "pipelined", "masked"])
def test_gated_op_adds_the_lowrank_term_before_the_activation(dtype, cfg):
    torch.manual_seed(10)
    k, j, group, rank = 70, 96, 16, 5
    x = torch.randn(1, k).to(dtype)
    packed = packing.interleave_gate_up((torch.randn(k, j) / 4).to(dtype), (torch.randn(k, j) / 4).to(dtype), group)
    b = packing.interleave_gate_up(torch.randn(rank, j).to(dtype), torch.randn(rank, j).to(dtype), group).T.contiguous()
    z = torch.randn(1, rank).to(dtype)
    t = _threshold(x, 0.5)
    m = torch.full((1, j), float("nan"), dtype=dtype)
    ops.launch_input_sparse(x, packed, t, None, None, b, z, replace(cfg, bn=4 * group), m, "silu", group)
    kept = torch.where(x.abs().float() > t, x, torch.zeros((), dtype=dtype))
    gu = (kept.double() @ packed.double() + z.double() @ b.double().T).to(dtype)
    g, u = packing.split_gate_up(gu, group)
    reference = (ACTS["silu"](g.float()).to(dtype) * u).double()
    assert _rel(m, reference) < TOL[dtype]
    assert torch.equal(op_defs.input_sparse_gated(x, packed, t, None, None, b, z, group, "silu", 0.5),
                       ops.input_sparse_gated(x, packed, t, None, None, b, z, group, "silu", 0.5))


def test_gated_op_names_a_bad_activation_and_batch():
    x, wt, t = torch.randn(1, 8), torch.randn(8, 64), torch.tensor(0.0)
    with pytest.raises(ValueError, match="act must be one of"):
        ops.input_sparse_gated(x, wt, t, None, None, None, None, 16, "swiglu", 0.5)
    with pytest.raises(ValueError, match="one token at a time"):
        ops.input_sparse_gated(torch.randn(2, 8), wt, t, None, None, None, None, 16, "silu", 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("features", [96, 300])  # one loop step (of 128 here), and three
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_topk_kept_matches_reference(dtype, features, ties, scaled):
    torch.manual_seed(features)
    x = torch.randn(3, features)
    if ties:  # a few distinct magnitudes: most scores tie with others, zeros among them
        x = (x * 2).round() / 2
    x = x.to(dtype)
    scale = torch.rand(features) + 0.5 if scaled else None
    for k in (1, 7, features // 2, features - 1, features):
        out = ops.topk_kept(x, k, scale)
        assert torch.equal(out, op_defs.topk_kept_reference(x, k, scale)), f"k={k}"
        assert torch.equal(op_defs.topk_kept(x, k, scale), out)  # the op on CPU tensors: these kernels


def test_topk_kept_all_tied_and_all_zero_rows():
    x = torch.stack([torch.full((300,), -1.5), torch.zeros(300)])
    out = ops.topk_kept(x, 130, None)
    assert torch.equal(out[0, :130], x[0, :130]) and not out[0, 130:].any() and not out[1].any()


def test_topk_kept_names_bad_inputs():
    with pytest.raises(ValueError, match="k must be in 1..8"):
        ops.topk_kept(torch.randn(2, 8), 9, None)
    with pytest.raises(ValueError, match="scale must be float32 of shape"):
        ops.topk_kept(torch.randn(2, 8), 3, torch.ones(7))


def test_ops_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, wt, t = torch.empty(3, 40), torch.empty(40, 24), torch.empty(())
        assert op_defs.input_sparse_linear(x, wt, t, None, None, None, None, 0.5).shape == (3, 24)
        assert op_defs.output_sparse_rows(x, torch.empty(3, 24), t, torch.empty(24, 40), 0.5).shape == (3, 24)
        assert op_defs.input_sparse_gated(x[:1], torch.empty(40, 64), t, None, None, None, None, 16, "silu", 0.5).shape == (1, 32)
        assert op_defs.topk_kept(x, 5, None).shape == (3, 40)


def test_ops_on_cpu_tensors_run_the_registered_kernels(monkeypatch):
    """Each op's CPU kernel is what was registered last for the CPU: here the Triton one."""
    calls = _record_launches(monkeypatch, lambda args: tuple(args[0].shape))
    x, wt = torch.randn(2, 40), torch.randn(40, 24)
    y = op_defs.input_sparse_linear(x, wt, torch.tensor(0.5), None, None, None, None, 0.5)
    assert calls == [(2, 40)]
    assert _rel(y, _reference(x, wt, torch.tensor(0.5))) < 1e-5


CATS = actsparse.CatsConfig(sparsity=0.5)


@pytest.mark.parametrize(
    "arch,config",
    [("llama", actsparse.WinaConfig(sparsity=0.5)), ("llama", CATS),
     ("llama", actsparse.TealConfig(sparsity=0.5, selection="topk")), ("phi3", CATS),
     ("llama", actsparse.CatsConfig(sparsity=0.5, selection="topk")),
     ("llama", actsparse.RSparseConfig(sparsity=0.5, alpha=0.8, shared_selection=True)),
     ("phi3", actsparse.RSparseConfig(sparsity=0.5, alpha=0.8)),
     ("llama", actsparse.RSparseConfig(sparsity=0.5, alpha=0.8, selection="topk"))],
    ids=["llama-wina", "llama-cats", "llama-teal-topk", "phi3-cats", "llama-cats-topk", "llama-rsparse-shared",
         "phi3-rsparse", "llama-rsparse-topk"],
)
def test_model_through_triton_backend_matches_torch(arch, config):
    model = tiny_model(arch)
    actsparse.sparsify_(model, config, random_tokens(1, 32))
    ids = random_tokens(2, 4, seed=5)  # 8 tokens: the kernels' largest batch
    with torch.no_grad():
        ref = model(ids).logits
        use_kernels(model)
        out = model(ids).logits
    assert _rel(out, ref.double()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_teal_thresholds_fused_gate_up_and_lowrank(arch):
    """TEAL thresholds (from the model's own activations), with an R-Sparse low-rank term on one
    linear; gate and up share one packed weight where they are separate linears."""
    model = _teal_half(arch)
    layer = model.model.layers[0]
    layer.self_attn.o_proj.set_lowrank(torch.randn(4, 64) * 0.1, torch.randn(64, 4) * 0.1)
    ids = random_tokens(1, 5, seed=6)
    with torch.no_grad():
        ref = model(ids).logits
        use_kernels(model)
        out = model(ids).logits
    if arch == "llama":
        assert layer.mlp.packed_gate_up_t is not None and layer.mlp.gate_proj.packed_weight_t is None
        attn = layer.self_attn
        assert attn.q_proj.packed_weight_t.shape == (64, sum(m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj)))
        assert attn.k_proj.packed_weight_t is None
    assert _rel(out, ref.double()) < 1e-5


def _record_launches(monkeypatch, field):
    """Patches the GEMV launcher to add `field(args)` of every launch to the list returned."""
    calls = []
    launch = ops.launch_input_sparse
    monkeypatch.setattr(ops, "launch_input_sparse", lambda *args: calls.append(field(args)) or launch(*args))
    return calls


def _launches_per_layer(model, ids, monkeypatch):
    launch = ops.launch_input_sparse
    calls = _record_launches(monkeypatch, lambda args: args[1].shape)
    with torch.no_grad():
        out = model(ids).logits
    monkeypatch.setattr(ops, "launch_input_sparse", launch)
    return out, len(calls) / len(model.model.layers)


def test_q_k_v_with_one_selection_run_as_one_kernel_call(monkeypatch):
    model = _teal_half("llama")
    ids = random_tokens(1, 1, seed=8)
    with torch.no_grad():
        ref = model(ids).logits
    use_kernels(model)
    out, launches = _launches_per_layer(model, ids, monkeypatch)
    assert launches == 4  # q/k/v, o, gate/up, down
    assert _rel(out, ref.double()) < 1e-5
    # torch.compile traces the group (no graph break) and computes the same.
    explained = torch._dynamo.explain(lambda i: model(input_ids=i).logits)(ids)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    with torch.no_grad():
        assert _rel(torch.compile(lambda i: model(input_ids=i).logits, backend="eager")(ids), ref.double()) < 1e-5
    # A new threshold for k: layer 0's q, k and v run alone, with no second call.
    attn = model.model.layers[0].self_attn
    attn.k_proj.set_threshold(2 * float(attn.k_proj.threshold), attn.k_proj.target)
    assert attn.q_proj.packed_weight_t.shape == (attn.q_proj.in_features, attn.q_proj.out_features)
    assert model.model.layers[1].self_attn.k_proj.packed_weight_t is None  # still a group
    out, launches = _launches_per_layer(model, ids, monkeypatch)
    assert launches == 4 + 2 / len(model.model.layers)
    use_kernels(model, False)
    with torch.no_grad():
        ref = model(ids).logits
    assert _rel(out, ref.double()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen2"])
def test_one_token_mlp_returns_the_gated_product_from_the_gate_up_kernel(arch, monkeypatch):
    model = _teal_half(arch)
    ids = random_tokens(1, 1, seed=8)
    with torch.no_grad():
        ref = model(ids).logits
    use_kernels(model)
    acts = _record_launches(monkeypatch, lambda args: args[9:10])
    with torch.no_grad():
        out = model(ids).logits
    expected = {"llama": "silu", "qwen2": "silu", "gemma": "gelu_tanh"}[arch]
    assert acts.count((expected,)) == len(model.model.layers)  # one gated call per MLP
    assert _rel(out, ref.double()) < 1e-5


@pytest.mark.parametrize("shared", [False, True], ids=["per-linear", "shared"])
def test_one_token_rsparse_mlp_returns_the_gated_product_with_its_lowrank_terms(shared, monkeypatch):
    """Gate and up with one selection (shared) return act(gate) * up, their low-rank terms added
    before the activation, from one gated launch; apart, each adds its own term."""
    model = tiny_model("llama")
    sparsify_(model, actsparse.RSparseConfig(sparsity=0.5, alpha=0.8, shared_selection=shared), random_tokens(1, 32))
    ids = random_tokens(1, 1, seed=8)
    with torch.no_grad():
        ref = model(ids).logits
    use_kernels(model)
    launches = _record_launches(monkeypatch, lambda args: (args[5] is not None, args[9:10]))
    with torch.no_grad():
        out = model(ids).logits
    assert sum(lowrank for lowrank, _ in launches) > 0
    assert sum(act == ("silu",) and lowrank for lowrank, act in launches) == (len(model.model.layers) if shared else 0)
    assert _rel(out, ref.double()) < 1e-5


def test_a_group_member_called_on_another_input_computes_it():
    model = _teal_half("llama")
    use_kernels(model)
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(1, 1, attn.q_proj.in_features), torch.randn(1, 1, attn.q_proj.in_features)
    with torch.no_grad():
        attn.q_proj(x)  # keeps k and v of x
        got = attn.k_proj(other)
        use_kernels(model, False)
        expected = attn.k_proj(other)
    assert _rel(got, expected.double()) < 1e-5


def test_triton_backend_decodes_one_token_at_a_time_through_the_kernels(monkeypatch):
    from actsparse.engine import DecodeEngine

    model = _teal_half("llama")
    prompt = random_tokens(1, 10, seed=7)
    reference = DecodeEngine(model, max_len=16).generate(prompt, 4).tokens
    use_kernels(model)
    batches = _record_launches(monkeypatch, lambda args: args[0].shape[0])
    tokens = DecodeEngine(model, max_len=16).generate(prompt, 4).tokens
    assert torch.equal(tokens, reference)
    assert batches and set(batches) == {1}  # decode steps only: the 10-token prefill (over 8) ran the reference


@pytest.mark.parametrize("kernel_faster", [True, False])
def test_batches_run_the_kernels_only_where_measured_faster(monkeypatch, kernel_faster):
    timed = []

    def timer(kernel, dense):
        timed.append((kernel(), dense()))  # both run: each returns its outputs
        return (1.0, 2.0) if kernel_faster else (2.0, 1.0)

    monkeypatch.setattr(batching, "kernel_and_dense_seconds", lambda kernel, dense, device: timer(kernel, dense))
    model = _teal_half("llama")
    ids = random_tokens(1, 3, seed=8)
    with torch.no_grad():
        ref = model(ids).logits
        use_kernels(model)
        launches = _record_launches(monkeypatch, lambda args: args[0].shape[0])
        out = model(ids).logits
        layer = model.model.layers[0]
        # q/k/v (one group), o, the MLP's gate+up call and down: one measurement each, at 3 tokens
        owners = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp, layer.mlp.down_proj]
        expected = (1.0, 2.0) if kernel_faster else (2.0, 1.0)
        assert all(owner.batch_seconds == {3: expected} for owner in owners)
        assert len(timed) == 4 * len(model.model.layers)
        kernel_launches = len(launches) - len(timed)  # the timer's own kernel calls left out
        assert kernel_launches == (4 * len(model.model.layers) if kernel_faster else 0)
        assert _rel(out, ref.double()) < 1e-5
        launches.clear()
        model(ids)  # measured once: no more timing, the same choice
        assert len(timed) == 4 * len(model.model.layers)
        assert len(launches) == (4 * len(model.model.layers) if kernel_faster else 0)
        gate = layer.mlp.gate_proj
        gate.set_threshold(float(gate.threshold), gate.target)  # a new sparsity state is measured again
        assert layer.mlp.batch_seconds == {} and layer.self_attn.o_proj.batch_seconds == {3: expected}
        use_kernels(model)  # so is every module that kernels are switched on for
        assert all(owner.batch_seconds == {} for owner in owners)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        launches.clear()
        model(ids)  # a batch first met while compiling runs the reference
        assert launches == [] and layer.mlp.batch_seconds == {}


def test_tuner_records_keys_ranks_candidates_and_takes_a_choice(monkeypatch):
    monkeypatch.setitem(tuning._TIMINGS, "key", [("slow", 2.0), ("too big", float("inf")), ("fast", 1.0)])
    with tuning.recording() as keys:
        tuning.choose("key", ["slow", "fast"], lambda cfg: None, torch.device("cpu"))
        tuning.choose("other", ["only"], lambda cfg: None, torch.device("cpu"))
        tuning.choose("key", ["slow", "fast"], lambda cfg: None, torch.device("cpu"))
    assert keys == {"key": 2, "other": 1} and list(keys) == ["key", "other"]
    assert tuning.ranked("key", 3) == ["fast", "slow"] and tuning.ranked("other", 3) == []
    assert tuning.best_seconds("key") == 1.0 and tuning.best_seconds("other") == 0.0
    monkeypatch.delitem(tuning._CHOICES, "key", raising=False)
    tuning.set_choice("key", "slow")
    assert tuning.tuned()["key"] == "slow"
    tuning._CHOICES.pop("key")
    with pytest.raises(ValueError, match="not a timed candidate"):
        tuning.set_choice("key", "unknown")


def test_tuner_times_a_new_cuda_problem_once_and_logs_it(monkeypatch, caplog):
    times = {"slow": 2e-6, "fast": 1e-6}
    timed = []
    monkeypatch.setattr(tuning, "seconds", lambda fn, device: fn() or times[timed[-1]])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    caplog.set_level("INFO", logger=tuning.__name__)
    try:
        for _ in range(2):
            assert tuning.choose("new-key", ["slow", "fast"], timed.append, torch.device("cuda")) == "fast"
        assert timed == ["slow", "fast"]  # the second call takes the remembered choice
        (line,) = [r.getMessage() for r in caplog.records if r.name == tuning.__name__]
        assert line.startswith("tuned new-key: 2 candidates in ") and line.endswith("best 1.0 us")
    finally:
        tuning._CHOICES.pop("new-key", None)
        tuning._TIMINGS.pop("new-key", None)


@pytest.mark.long
def test_engine_tune_times_each_alternative_inside_the_step_and_keeps_the_fastest(monkeypatch):
    from actsparse.engine import DecodeEngine

    model = _teal_half("llama")
    prompt = random_tokens(1, 10, seed=7)  # over 8 tokens: the prefill runs the reference
    engine = DecodeEngine(model, max_len=16, decode_attention=False)  # the GEMV kernels' keys only
    reference = engine.generate(prompt, 4).tokens
    use_kernels(model)
    with tuning.recording() as keys:
        engine.generate(prompt, 3)
    assert keys and all(k[0] in ("gemv", "gated") for k in keys)
    alternatives = [ops.GemvConfig(64, 16, 1, 4, 1), ops.GemvConfig(64, 32, 3, 4, 1)]  # fit gate/up groups of 32
    for key in keys:  # as if the GPU tuner had timed two candidates alone
        monkeypatch.setitem(tuning._TIMINGS, key, [(cfg, 1.0 + i) for i, cfg in enumerate(alternatives)])
    report = engine.tune(prompt, tokens=3)
    assert set(report) == {str(k) for k in keys}
    for key in keys:
        times = report[str(key)]
        assert set(times) == {str(c) for c in alternatives} and all(t > 0 for t in times.values())
        assert str(tuning.tuned()[key]) == min(times, key=times.get)
        tuning._CHOICES.pop(key)
    assert engine.untuned == []
    assert torch.equal(engine.generate(prompt, 4).tokens, reference)


@pytest.mark.long
def test_engine_tune_goes_largest_share_first_and_stops_at_its_budget(monkeypatch):
    from actsparse.engine import DecodeEngine

    model = _teal_half("llama")
    prompt = random_tokens(1, 10, seed=7)
    engine = DecodeEngine(model, max_len=16, decode_attention=False)
    use_kernels(model)
    with tuning.recording() as calls:
        engine.generate(prompt, 3)
    alternatives = [ops.GemvConfig(64, 16, 1, 4, 1), ops.GemvConfig(64, 32, 3, 4, 1)]
    alone = {key: float(i + 1) for i, key in enumerate(calls)}  # the last key met: the largest time alone
    for key in calls:
        monkeypatch.setitem(tuning._TIMINGS, key, [(cfg, alone[key] + i) for i, cfg in enumerate(alternatives)])
    share = sorted(calls, key=lambda k: calls[k] * alone[k], reverse=True)
    assert len(share) >= 2
    order = []
    monkeypatch.setattr(tuning, "set_choice", lambda key, cfg: order.append(key) or tuning._CHOICES.__setitem__(key, cfg))
    engine.tune(prompt, tokens=3)
    assert list(dict.fromkeys(order)) == share
    for key in calls:
        tuning._CHOICES.pop(key)
    assert engine.tune(prompt, tokens=3, budget_s=0) == {}  # the first problem starts after the budget
    assert engine.untuned == [str(k) for k in share]
    assert all(key not in tuning._CHOICES for key in calls)  # each keeps its choice alone (none made here)
    with pytest.raises(ActSparseError, match="budget_s"):
        engine.tune(prompt, tokens=3, budget_s=-1)


def test_gate_driven_mlp_batches_are_measured_as_a_whole(monkeypatch):
    monkeypatch.setattr(batching, "kernel_and_dense_seconds", lambda kernel, dense, device: (kernel(), dense()) and (2.0, 1.0))
    model = tiny_model("llama")
    actsparse.sparsify_(model, CATS, random_tokens(1, 32))
    ids = random_tokens(1, 4, seed=9)
    with torch.no_grad():
        ref = model(ids).logits
        use_kernels(model)
        out = model(ids).logits
    assert model.model.layers[0].mlp.batch_seconds == {4: (2.0, 1.0)}
    assert _rel(out, ref.double()) < 1e-5
