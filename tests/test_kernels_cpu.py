"""The C++ CPU kernels, registered with the dispatcher as the CPU kernels of the `actsparse::`
ops, against the torch reference (called, traced and compiled), and tiny models running them."""
import os
import shutil
import stat

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.errors import ActSparseError
from actsparse.kernels import cpu_ops, ops
from actsparse.runtime import use_kernels
from tiny import random_tokens, tiny_model

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the cpu kernels build with g++")


def _threshold(x, sparsity):
    return torch.tensor(-1.0 if sparsity == 0 else float(x.abs().quantile(sparsity)))


def _reference(x, wt, t, scale=None, bias=None):
    score = x.abs() * (scale if scale is not None else 1.0)
    y = torch.where(score > t, x, 0.0).double() @ wt.double()
    return y + bias.double() if bias is not None else y


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.95])
@pytest.mark.parametrize("shape", [(100, 70), (576, 1536), (1029, 5)])
def test_input_sparse_matches_reference(batch, sparsity, shape):
    torch.manual_seed(0)
    k, n = shape
    x, wt = torch.randn(batch, k), torch.randn(k, n)
    t = _threshold(x, sparsity)
    y = ops.input_sparse_linear(x, wt, t, None, None, None, None, sparsity)
    assert _rel(y, _reference(x, wt, t)) < 1e-5


@pytest.mark.parametrize("batch", [1, 2])
def test_input_sparse_scale_bias_lowrank(kernel_path, batch):
    torch.manual_seed(1)
    x, wt = torch.randn(batch, 67), torch.randn(67, 45)
    scale, bias = torch.rand(67) + 0.5, torch.randn(45)
    lrb, lrz = torch.randn(45, 5), torch.randn(batch, 5)
    t = _threshold(x, 0.5)
    y = ops.input_sparse_linear(x, wt, t, scale, bias, lrb, lrz, 0.5)
    ref = _reference(x, wt, t, scale, bias) + lrz.double() @ lrb.double().T
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_lowrank_term_in_half_precision_is_rounded_once(dtype, batch):
    """The low-rank term joins the GEMV's fp32 product before the one rounding to the
    activations' dtype: within an ulp of the exact result rounded once."""
    cpu_ops.library()
    torch.manual_seed(2)
    x, wt = torch.randn(batch, 96).to(dtype), torch.randn(96, 40).to(dtype)
    lrb, lrz = torch.randn(40, 7).to(dtype), torch.randn(batch, 7).to(dtype)
    t = _threshold(x.float(), 0.5)
    y = ops.input_sparse_linear(x, wt, t, None, None, lrb, lrz, 0.5)
    exact = _reference(x.double(), wt.double(), t) + lrz.double() @ lrb.double().T
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert y.dtype == dtype and ((y.double() - exact).abs() <= ulp).all()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_output_sparse_rows_matches_reference(batch, sparsity):
    torch.manual_seed(2)
    x, a, w = torch.randn(batch, 100), torch.randn(batch, 70), torch.randn(70, 100)
    t = _threshold(a, sparsity)
    m = ops.output_sparse_rows(x, a, t, w, sparsity)
    ref = torch.where(a.abs() > t, a, 0.0).double() * (x.double() @ w.double().T)
    assert _rel(m, ref) < 1e-5
    assert torch.equal(m == 0, ref == 0)


# (vector path, threads): the best path this CPU has, with 1 and 2 threads, and forced lower paths.
PATHS = [(None, 1), (None, 2), ("avx2", 2), ("scalar", 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=PATHS, ids=lambda p: f"{p[0] or 'best'}-t{p[1]}")
def kernel_path(request):
    isa, threads = request.param
    best = cpu_ops.set_isa(None)
    if isa is not None and cpu_ops.ISA_NAMES.index(isa) > cpu_ops.ISA_NAMES.index(best):
        pytest.skip(f"this CPU has no {isa} path")
    cpu_ops.set_isa(isa)
    cpu_ops.set_threads(threads)
    yield
    cpu_ops.set_isa(None)
    cpu_ops.set_threads(1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sparsity", [None, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(100, 70), (1029, 5), (64, 4100)])
def test_input_sparse_dtypes_paths_threads(kernel_path, dtype, batch, sparsity, shape):
    torch.manual_seed(3)
    k, n = shape
    x, wt = torch.randn(batch, k), torch.randn(k, n).to(dtype)
    bias = torch.randn(n)
    t = torch.tensor(-1.0) if sparsity is None else _threshold(x, sparsity)  # -1: every row kept
    y = ops.input_sparse_linear(x, wt, t, None, bias, None, None, sparsity or 0.0)
    ref = _reference(x, wt.float(), t, bias=bias)
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.95])
@pytest.mark.parametrize("shape", [(70, 100), (3, 1029)])
def test_output_sparse_rows_dtypes_paths_threads(kernel_path, dtype, batch, sparsity, shape):
    torch.manual_seed(4)
    j, d = shape
    x, a, w = torch.randn(batch, d), torch.randn(batch, j), torch.randn(j, d).to(dtype)
    t = _threshold(a, sparsity)
    m = ops.output_sparse_rows(x, a, t, w, sparsity)
    ref = torch.where(a.abs() > t, a, 0.0).double() * (x.double() @ w.double().T)
    assert _rel(m, ref) < 1e-5
    assert torch.equal(m == 0, ref == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", [(70, 100), (5, 17), (37, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_rows_dtypes_paths_threads(kernel_path, dtype, batch, shape, with_bias):
    torch.manual_seed(5)
    j, d = shape
    x, w = torch.randn(batch, d), torch.randn(j, d).to(dtype)
    bias = torch.randn(j) if with_bias else None
    y = ops.dense_linear(x, w, bias)
    ref = x.double() @ w.double().T + (bias.double() if with_bias else 0.0)
    assert _rel(y, ref) < 1e-5


def test_paths_and_threads_are_checked():
    best = cpu_ops.set_isa(None)
    assert cpu_ops.isa() == best
    with pytest.raises(ActSparseError, match="unknown cpu kernel path"):
        cpu_ops.set_isa("sse9")
    with pytest.raises(ActSparseError, match="threads >= 1"):
        cpu_ops.set_threads(0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16 tensors; weight_t is Char"):
        ops.input_sparse_linear(torch.randn(1, 8), torch.zeros(8, 4, dtype=torch.int8), torch.tensor(0.0), None, None,
                                None, None, 0.0)


def test_rejects_other_dtypes():
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16 tensors; x is Double"):
        ops.input_sparse_linear(torch.randn(1, 8).double(), torch.randn(8, 4), torch.tensor(0.0), None, None, None, None, 0.5)
    with pytest.raises(RuntimeError, match="input_sparse_linear: x \\[1, 8\\] does not fit weight_t \\[9, 4\\]"):
        ops.input_sparse_linear(torch.randn(1, 8), torch.randn(9, 4), torch.tensor(0.0), None, None, None, None, 0.5)
    with pytest.raises(RuntimeError, match="a of the activations' dtype"):
        ops.output_sparse_rows(torch.randn(1, 8).half(), torch.randn(1, 4), torch.tensor(0.0), torch.randn(4, 8), 0.5)
    model = tiny_model("llama", dtype=torch.float64)
    actsparse.sparsify_(model, actsparse.TealConfig(sparsity=0.5), random_tokens(1, 16))
    with pytest.raises(ActSparseError, match="no actsparse kernels for torch.float64"):
        use_kernels(model)


def test_library_is_cached_by_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    path = cpu_ops.library_path("g++")
    assert path.is_relative_to(tmp_path) and path == cpu_ops.library_path("g++")
    cpu_ops.build("g++", path)
    assert path.is_file() and not [p for p in path.parent.iterdir() if p != path]  # no partial files left
    for folder in (tmp_path / "cache", path.parent.parent, path.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert cpu_ops.trusted_library(path)


def test_cache_key_has_the_compilers_resolved_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path))
    link = tmp_path / "bin" / "g++"
    link.parent.mkdir()
    link.symlink_to(shutil.which("g++"))
    assert cpu_ops.library_path(str(link)) == cpu_ops.library_path("g++")  # the same compiler
    copy = tmp_path / "bin" / "other-g++"
    shutil.copy(os.path.realpath(shutil.which("g++")), copy)
    assert cpu_ops.library_path(str(copy)) != cpu_ops.library_path("g++")  # another one, same version
    with pytest.raises(ActSparseError, match="not found"):
        cpu_ops.library_path("no-such-compiler")


def test_a_library_others_can_write_is_removed_and_a_shared_cache_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    path = cpu_ops.library_path("g++")
    cpu_ops.build("g++", path)
    path.chmod(0o722)
    assert not cpu_ops.trusted_library(path) and not path.exists()
    path.parent.chmod(0o777)
    with pytest.raises(ActSparseError, match="not private"):
        cpu_ops.build("g++", path)


def _cpu_kernel_registered_from_cpp(op: str, key: str = "CPU") -> bool:
    return any(line.startswith(f"{key}:") and "cpu_torch_ops.cpp" in line
               for line in torch._C._dispatch_dump(f"actsparse::{op}").splitlines())


CPP_OPS = ("input_sparse_linear", "input_sparse_gated", "output_sparse_rows", "dense_linear", "decode_attention", "topk_kept")


def test_cpu_ops_dispatch_to_the_cpp_kernel_and_compile():
    """The C++ kernels are the ops' CPU kernels, registered from C++ (and can step aside and come
    back); a function of the ops compiles with torch.compile and gives the eager result."""
    torch.manual_seed(3)
    x, wt, w = torch.randn(2, 64), torch.randn(64, 48), torch.randn(40, 64)
    t = _threshold(x, 0.5)
    cpu_ops.library()
    keys = ("CPU", "AutogradCPU")  # the autograd kernel in C++ too: custom_op's Python one costs ~5 us a call
    assert all(_cpu_kernel_registered_from_cpp(op, key) for op in CPP_OPS for key in keys)
    cpu_ops.unregister()
    try:
        assert not any(_cpu_kernel_registered_from_cpp(op, key) for op in CPP_OPS for key in keys)
    finally:
        cpu_ops.register()
    assert all(_cpu_kernel_registered_from_cpp(op, key) for op in CPP_OPS for key in keys)

    def step(x):
        y = ops.input_sparse_linear(x, wt, t, None, None, None, None, 0.5)
        return ops.output_sparse_rows(x, ops.topk_kept(y[:, :40], 10, None), torch.tensor(0.0), w, 0.75)

    eager = step(x)
    compiled = torch.compile(step, backend="inductor", fullgraph=True)(x)
    assert torch.equal(eager, compiled)
    y = ops.input_sparse_linear_reference(x, wt, t, None, None, None, None, 0.5)
    ref = ops.output_sparse_rows_reference(x, ops.topk_kept_reference(y[:, :40], 10, None), torch.tensor(0.0), w, 0.75)
    assert _rel(eager, ref.double()) < 1e-5


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-3, 3), min_size=1, max_size=40), data=st.data(),
       dtype=st.sampled_from(DTYPES), scaled=st.booleans())
def test_topk_kept_is_the_reference_entry_for_entry(values, data, dtype, scaled):
    """Few distinct values, so most rows have ties at the k-th score: the lowest indices win, as in
    the reference, whatever the dtype, scale or k."""
    cpu_ops.library()
    d = len(values)
    x = torch.tensor(values, dtype=torch.float32).to(dtype).reshape(1, d).repeat(2, 1)
    x[1] = x[1].flip(0)
    k = data.draw(st.integers(1, d))
    scale = torch.tensor(data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=d, max_size=d))) if scaled else None
    got = ops.topk_kept(x, k, scale)
    assert got.dtype == dtype and torch.equal(got, ops.topk_kept_reference(x, k, scale))


def test_topk_kept_batches_nan_rows_and_bad_k():
    cpu_ops.library()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 1536)
    x[0, 1, 7] = float("nan")  # the reference keeps nothing of a row whose top k holds a NaN
    for k in (1, 768, 1536):
        assert torch.equal(ops.topk_kept(x, k, None).nan_to_num(), ops.topk_kept_reference(x, k, None).nan_to_num())
    assert not ops.topk_kept(x, 768, None)[0, 1].any()
    with pytest.raises(RuntimeError, match=r"k must be in 1..1536, got 0"):
        ops.topk_kept(x, 0, None)
    with pytest.raises(RuntimeError, match="scale must have 1536 entries"):
        ops.topk_kept(x, 5, torch.ones(3))


def test_cpu_ops_on_tensors_that_require_grad_run_and_refuse_backward():
    """The C++ autograd kernel keeps custom_op's behaviour for an op with no backward: the forward
    runs (model weights are parameters), and backward through it raises."""
    cpu_ops.library()
    x, wt = torch.randn(1, 32), torch.nn.Parameter(torch.randn(32, 16))
    y = ops.input_sparse_linear(x, wt, _threshold(x, 0.5), None, None, None, None, 0.5)
    assert y.requires_grad
    assert torch.equal(y.detach(), ops.input_sparse_linear(x, wt.detach(), _threshold(x, 0.5), None, None, None, None, 0.5))
    with pytest.raises(RuntimeError, match="derivative for actsparse::input_sparse_linear is not implemented"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", sorted(ops.ACTIVATIONS))
@pytest.mark.parametrize("group", [1, 8, 16, 32])  # the vector epilogue takes groups of whole vectors
def test_input_sparse_gated_matches_reference(kernel_path, dtype, act, group):
    torch.manual_seed(11)
    x, wt = torch.randn(3, 96).to(dtype), torch.randn(96, 2 * 64).to(dtype)
    bias = torch.randn(128) * 30  # gate values far into both tails of the activation
    t = _threshold(x.float(), 0.5)
    m = ops.input_sparse_gated(x, wt, t, None, bias, None, None, group, act, 0.5)
    gu = _reference(x.float(), wt.float(), t, bias=bias).float()
    pairs = gu.reshape(3, 64 // group, 2, group)
    ref = ops.ACTIVATIONS[act](pairs[:, :, 0].reshape(3, 64)) * pairs[:, :, 1].reshape(3, 64)
    assert m.dtype == dtype
    assert _rel(m, ref.double()) < (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(RuntimeError, match="act must be one of gelu, gelu_tanh, relu, silu, got tanh"):
        ops.input_sparse_gated(x, wt, t, None, bias, None, None, group, "tanh", 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
@pytest.mark.parametrize("softcap", [0.0, 20.0])
@pytest.mark.parametrize("head_dim", [32, 72, 128])
def test_decode_attention_matches_reference(kernel_path, dtype, mask_kind, softcap, head_dim):
    torch.manual_seed(12)
    batch, heads, kv_heads, q_len, kv_len = 2, 6, 2, 3 if mask_kind != "none" else 1, 40
    q = torch.randn(batch, heads, q_len, head_dim).to(dtype)
    k, v = torch.randn(2, batch, kv_heads, kv_len, head_dim).to(dtype)
    # a static cache filled up to position 20: keys beyond it are masked (and never read)
    keep = (torch.arange(kv_len)[None, None, None, :] < 20 + torch.arange(q_len)[None, None, :, None]).expand(batch, 1, q_len, kv_len)
    mask = {"bool": keep, "additive": torch.where(keep, 0.0, float("-inf")).to(dtype), "none": None}[mask_kind]
    if mask_kind == "none":
        k, v = k[:, :, :20].contiguous(), v[:, :, :20].contiguous()
    out = ops.decode_attention(q, k, v, mask, 0.125, softcap)
    ref = ops.decode_attention_reference(q.double(), k.double(), v.double(),
                                         mask.double() if mask_kind == "additive" else mask, 0.125, softcap)
    assert out.dtype == dtype and out.shape == (batch, q_len, heads, head_dim)
    assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_decode_attention_gives_zeros_where_nothing_is_attended():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 5, 8)
    out = ops.decode_attention(q, k, k, torch.zeros(1, 1, 1, 5, dtype=torch.bool), 1.0, 0.0)
    assert torch.equal(out, torch.zeros(1, 1, 2, 8))


def test_compiled_cpu_decode_of_a_sparse_model_matches_torch():
    model = tiny_model("llama")
    actsparse.sparsify_(model, actsparse.TealConfig(sparsity=0.5), random_tokens(1, 32))
    ids = random_tokens(1, 1, seed=6)
    with torch.no_grad():
        ref = model(ids).logits
        use_kernels(model)
        out = torch.compile(model, backend="inductor", fullgraph=False)(ids).logits
    assert _rel(out, ref.double()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen3", "gemma2"])
@pytest.mark.parametrize(
    "config",
    [actsparse.TealConfig(sparsity=0.5), actsparse.WinaConfig(sparsity=0.5), actsparse.CatsConfig(sparsity=0.5),
     actsparse.CatsConfig(sparsity=0.5, selection="topk"), actsparse.RSparseConfig(sparsity=0.5, alpha=0.8),
     actsparse.RSparseConfig(sparsity=0.5, alpha=0.8, shared_selection=True),
     actsparse.RSparseConfig(sparsity=0.5, alpha=0.8, selection="topk", shared_selection=True)],
    ids=["teal", "wina", "cats", "cats-topk", "rsparse", "rsparse-shared", "rsparse-shared-topk"],
)
def test_model_through_cpu_backend_matches_torch(arch, config):
    """R-Sparse: the folded low-rank path (W - B A over the kept channels, z = A x), alone or for a
    group of linears reading one input as one call with a block-diagonal B."""
    model = tiny_model(arch)
    actsparse.sparsify_(model, config, random_tokens(1, 32))
    ids = random_tokens(2, 4, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
        use_kernels(model)
        out = model(ids).logits
    if isinstance(config, actsparse.RSparseConfig) and arch != "phi3":  # phi3's qkv and gate_up are one linear each
        layer = model.model.layers[0]
        assert (layer.self_attn.q_proj.packed_lowrank_b is not None) == config.shared_selection
        assert (layer.mlp.packed_lowrank_b is not None) == config.shared_selection
    assert _rel(out, ref.double()) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_sparse_gated_adds_the_lowrank_term_before_the_activation(dtype):
    torch.manual_seed(12)
    x, wt = torch.randn(1, 96).to(dtype), torch.randn(96, 128).to(dtype)
    b, z = torch.randn(128, 6).to(dtype), torch.randn(1, 6).to(dtype)
    t = _threshold(x.float(), 0.5)
    m = ops.input_sparse_gated(x, wt, t, None, None, b, z, 16, "silu", 0.5)
    gu = _reference(x.float(), wt.float(), t) + z.double() @ b.double().T
    pairs = gu.reshape(1, 4, 2, 16)
    ref = torch.nn.functional.silu(pairs[:, :, 0].reshape(1, 64)) * pairs[:, :, 1].reshape(1, 64)
    assert _rel(m, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(RuntimeError, match="lowrank_b .* do not fit"):
        ops.input_sparse_gated(x, wt, t, None, None, b[:64], z, 16, "silu", 0.5)


@pytest.mark.parametrize("shared", [False, True], ids=["per-linear", "shared"])
def test_one_rsparse_token_through_cpu_backend_matches_torch(shared):
    model = tiny_model("llama")
    actsparse.sparsify_(model, actsparse.RSparseConfig(sparsity=0.5, alpha=0.8, shared_selection=shared), random_tokens(1, 32))
    ids = random_tokens(1, 1, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
        use_kernels(model)
        out = model(ids).logits
    assert (model.model.layers[0].mlp._gated_act is not None) == shared
    assert _rel(out, ref.double()) < 1e-5


def test_new_lowrank_factors_of_the_same_shape_reach_the_kernel():
    from actsparse.kernels import load_kernels
    from actsparse.nn import SparseLinear

    torch.manual_seed(6)
    linear = SparseLinear.from_linear(torch.nn.Linear(64, 48, bias=False))
    linear.set_threshold(0.5, 0.5)
    linear.set_lowrank(torch.randn(4, 64), torch.randn(48, 4))
    load_kernels(torch.device("cpu"))
    linear.set_kernels(True)
    x = torch.randn(1, 64)
    linear(x)
    linear.set_lowrank(torch.randn(4, 64), torch.randn(48, 4))
    assert _rel(linear(x), linear.reference(x).double()) < 1e-5


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
def test_activations_of_the_models_dtype_are_widened_and_rounded_once(kernel_path, act, weight_dtype):
    """bf16 / fp16 activations give exactly the fp32 kernel's result on the widened input, rounded
    to nearest even like torch's `.to`, in every op."""
    torch.manual_seed(7)
    x = torch.randn(3, 100).to(act)
    wt, w = torch.randn(100, 70).to(weight_dtype), torch.randn(70, 100).to(weight_dtype)
    bias = torch.randn(70)
    t = _threshold(x.float(), 0.5)
    y = ops.input_sparse_linear(x, wt, t, None, bias, None, None, 0.5)
    assert y.dtype == act
    assert torch.equal(y, ops.input_sparse_linear(x.float(), wt, t, None, bias, None, None, 0.5).to(act))
    assert torch.equal(ops.dense_linear(x, w, bias), ops.dense_linear(x.float(), w, bias).to(act))
    a = torch.randn(3, 70).to(act)
    ta = _threshold(a.float(), 0.5)
    m = ops.output_sparse_rows(x, a, ta, w, 0.5)
    assert torch.equal(m, ops.output_sparse_rows(x.float(), a.float(), ta, w, 0.5).to(act))


def test_fp16_outputs_round_like_torch_across_the_range():
    """Subnormal, normal, overflowing and tied values of the fp16 rounding on the way out."""
    scales = torch.logspace(-30, 20, 400, base=2.0)
    x = torch.ones(1, 400, dtype=torch.float16)
    w = torch.diag(scales)  # y_j = x_j * scale_j, one exact product per output
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-24 * 1.5, 2**-24 * 2.5, 65520.0, 65519.0])
    w = torch.block_diag(w, torch.diag(ties))
    x = torch.ones(1, w.shape[1], dtype=torch.float16)
    y = ops.dense_linear(x, w, None)
    assert torch.equal(y, torch.diagonal(w)[None].to(torch.float16))


def test_bf16_outputs_round_like_torch():
    torch.manual_seed(8)
    values = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,)).float(),
                        torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, float("inf"), -float("inf")])])
    x = torch.ones(1, values.numel(), dtype=torch.bfloat16)
    assert torch.equal(ops.dense_linear(x, torch.diag(values), None)[0], values.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_model_runs_the_dense_kernel_and_the_lm_head_stays_tied(dtype):
    from actsparse.nn import DenseLinear, SparseLinear
    from actsparse.swap import swap_modules

    model = tiny_model("llama").to(dtype)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = random_tokens(1, 5, seed=9)
    with torch.no_grad():
        ref = model(ids[:, :1]).logits
        swap_modules(model)
        use_kernels(model)
        assert isinstance(model.lm_head, DenseLinear)
        assert model.lm_head.weight is model.get_input_embeddings().weight
        assert all(m.dense_kernel for m in model.modules() if isinstance(m, SparseLinear))
        with torch.profiler.profile(record_shapes=True) as prof:
            out = model(ids[:, :1]).logits
        calls = [e.input_shapes[1][0] for e in prof.events() if e.name == "actsparse::dense_linear"]
        assert model.config.vocab_size in calls  # the LM head
        assert len(calls) == 1 + 4 * model.config.num_hidden_layers  # q/k/v as one call, gate/up as one
        use_kernels(model, False)
        assert torch.equal(model(ids[:, :1]).logits, ref)
    assert out.dtype == dtype
    assert _rel(out.float(), ref.double()) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_bf16_sparse_model_through_the_cpu_kernels_matches_torch():
    model = tiny_model("llama").to(torch.bfloat16)
    actsparse.sparsify_(model, actsparse.TealConfig(sparsity=0.5), random_tokens(1, 32))
    ids = random_tokens(1, 1, seed=10)
    with torch.no_grad():
        ref = model(ids).logits
        use_kernels(model)
        out = model(ids).logits
    assert out.dtype == torch.bfloat16
    assert _rel(out.float(), ref.double()) < 2e-2


@pytest.mark.parametrize("method", ["larosa", "teal"])
def test_weights_changed_under_running_kernels_are_repacked(method):
    """A method that rewrites weights (LaRoSA's folds) on a model whose kernels are already on:
    `use_kernels` afterwards runs the new weights, not packs of the old ones (q/k/v and gate/up
    packed together included)."""
    from actsparse import make_config, sparsify_
    from tiny import CALIB

    model = tiny_model("llama")
    use_kernels(model)  # packs of the dense weights
    ids = random_tokens(1, 1, seed=9)
    with torch.no_grad():
        model(ids)
        sparsify_(model, make_config(method, sparsity=0.5), CALIB)
        use_kernels(model, False)
        ref = model(ids).logits
        use_kernels(model)
        out = model(ids).logits
    assert _rel(out, ref.double()) < 1e-5


def test_a_weight_written_in_place_is_repacked():
    from actsparse.kernels import load_kernels
    from actsparse.nn import SparseLinear

    torch.manual_seed(7)
    linear = SparseLinear.from_linear(torch.nn.Linear(64, 48, bias=False))
    linear.set_threshold(0.5, 0.5)
    load_kernels(torch.device("cpu"))
    linear.set_kernels(True)
    x = torch.randn(1, 64)
    linear(x)
    with torch.no_grad():
        linear.weight.mul_(-2.0)
    linear.set_kernels(True)
    assert _rel(linear(x), linear.reference(x).double()) < 1e-5
