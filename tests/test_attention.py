"""The decode attention kernel against a float64 reference (Triton interpreter, registered as the
op's CPU kernel for this module), the op's torch reference likewise, and the kernel in models.

bf16 goes through the interpreter's `tl.dot`, which is wrong for bf16 operands: checked on the GPU
by benchmarks/gpu_matrix.py.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("these tests run the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

from actsparse.attention import builds_on, decode_attention_name, use_decode_attention  # noqa: E402
from actsparse.engine import DecodeEngine  # noqa: E402
from actsparse.errors import ActSparseError  # noqa: E402
from actsparse.kernels import attention_ops as ops  # noqa: E402
from actsparse.kernels import cpu_ops, load_kernels  # noqa: E402
from actsparse.kernels import ops as op_defs  # noqa: E402
from tiny import ARCHS, random_tokens, tiny_model  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
CONFIGS = {"one-split": ops.AttentionConfig(16, 256, 4, 1), "splits": ops.AttentionConfig(16, 32, 4, 1)}


def _reference(q, k, v, mask, scale, softcap=0.0):
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.nan_to_num(torch.softmax(s, -1)).matmul(v).transpose(1, 2)


@pytest.fixture(autouse=True, scope="module")
def triton_attention_on_cpu():
    """The Triton kernel as the op's CPU kernel (the interpreter runs it on CPU tensors), the C++
    kernels set aside meanwhile (and loaded first: `use_decode_attention` loads them)."""
    load_kernels("cpu")
    cpu_ops.unregister()
    ops.register("cpu")
    yield
    cpu_ops.register()


def _inputs(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, filled, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g).to(dtype)
    # A static cache filled up to `filled` (+ the query's position): a causal mask over it.
    keep = torch.arange(kv_len)[None, None, None, :] < filled + torch.arange(q_len)[None, None, :, None] + 1
    return q, k, v, keep.expand(batch, 1, q_len, kv_len)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 100, 64), (2, 6, 2, 3, 70, 96), (1, 4, 4, 1, 33, 32), (1, 32, 1, 2, 20, 16)])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_decode_attention_matches_reference(dtype, shape, mask_kind, cfg):
    batch, heads, kv_heads, q_len, kv_len, head_dim = shape
    q, k, v, keep = _inputs(*shape, dtype, filled=kv_len // 2)
    mask = {"bool": keep, "additive": torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf")),
            "none": None}[mask_kind]
    out = torch.full((batch, q_len, heads, head_dim), float("nan"), dtype=dtype)
    ops.launch_decode_attention(q, k, v, mask, head_dim ** -0.5, 0.0, cfg, out)
    assert _rel(out, _reference(q, k, v, keep if mask is not None else None, head_dim ** -0.5)) < TOL[dtype]


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_decode_attention_softcap_and_a_query_with_nothing_to_attend(cfg):
    q, k, v, keep = _inputs(1, 4, 2, 2, 50, 32, torch.float32, filled=20)
    keep = keep.clone()
    keep[..., 1, :] = False  # the second query position may attend nothing
    out = torch.full((1, 2, 4, 32), float("nan"))
    ops.launch_decode_attention(q, k, v, keep, 0.3, 5.0, cfg, out)
    ref = _reference(q, k, v, keep, 0.3, softcap=5.0)
    assert _rel(out[:, 0], ref[:, 0]) < 1e-5
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))


def test_decode_attention_names_what_it_cannot_take():
    q, k, v, keep = _inputs(1, 4, 2, 1, 16, 32, torch.float32, filled=8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ops.decode_attention(q, k[:, :1].expand(1, 3, 16, 32).contiguous(), v[:, :1].expand(1, 3, 16, 32).contiguous(),
                             keep, 1.0, 0.0)
    with pytest.raises(ValueError, match="at most 64"):
        ops.decode_attention(q.expand(1, 4, 40, 32), k, v, None, 1.0, 0.0)
    with pytest.raises(ValueError, match="one dtype"):
        ops.decode_attention(q.half(), k, v, keep, 1.0, 0.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.decode_attention(q, k, v, keep[..., :8], 1.0, 0.0)
    with pytest.raises(ValueError, match="boolean or additive"):
        ops.decode_attention(q, k, v, keep.int(), 1.0, 0.0)


def test_decode_attention_traces_with_fake_tensors():
    q, k, v, keep = _inputs(1, 4, 2, 1, 16, 32, torch.float32, filled=8)
    compiled = torch.compile(lambda *a: op_defs.decode_attention(*a, 0.25, 0.0) * 2, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v, keep), 2 * op_defs.decode_attention(q, k, v, keep, 0.25, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_the_ops_torch_reference_matches_float64(dtype, mask_kind):
    q, k, v, keep = _inputs(2, 6, 2, 3, 40, 16, dtype, filled=20)
    keep = keep.clone()
    keep[0, :, 1, :] = False  # a query with nothing to attend: zeros
    mask = {"bool": keep, "additive": torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf")),
            "none": None}[mask_kind]
    out = op_defs.decode_attention_reference(q, k, v, mask, 0.25, 3.0)
    ref = _reference(q, k, v, keep if mask is not None else None, 0.25, softcap=3.0)
    assert out.dtype == dtype and out.shape == (2, 3, 6, 16)
    assert _rel(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        op_defs.decode_attention_reference(q[:, :5], k, v, None, 1.0, 0.0)


def _decode_logits(model, prompt, steps):
    """Logits of `steps` one-token decode steps after `prompt`, through a static cache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 3)
    with torch.no_grad():
        out = model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt.shape[1]))
        logits, token = [], out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            pos = torch.tensor([prompt.shape[1] + i])
            step = model(token, past_key_values=cache, use_cache=True, cache_position=pos).logits
            logits.append(step)
            token = step[:, -1:].argmax(-1)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_models_decode_through_the_kernel_as_through_their_own_attention(arch, monkeypatch):
    model = tiny_model(arch)
    prompt = random_tokens(2, 40, seed=5)  # 2 x 40 queries per KV head: a prefill, for the model's own attention
    own = _decode_logits(model, prompt, 4)
    base = model.config._attn_implementation
    calls, launch = [], ops.launch_decode_attention
    monkeypatch.setattr(ops, "launch_decode_attention", lambda *a: (calls.append(1), launch(*a))[1])
    assert use_decode_attention(model) == decode_attention_name(base)
    assert use_decode_attention(model) == decode_attention_name(base)  # once is enough
    kernel = _decode_logits(model, prompt, 4)
    assert len(calls) == 4 * model.config.num_hidden_layers
    assert (kernel - own).abs().max() < 1e-4


def test_use_decode_attention_names_the_implementations_it_builds_on():
    model = tiny_model("llama")
    assert builds_on(model)
    model.config._attn_implementation = "flex_attention"
    assert not builds_on(model)
    with pytest.raises(ActSparseError, match="sdpa or eager"):
        use_decode_attention(model)


def test_engine_decodes_through_the_kernel_on_request():
    model = tiny_model("qwen2")
    prompt = random_tokens(1, 5, seed=3)
    plain = DecodeEngine(model, max_len=16).generate(prompt, 8).tokens
    engine = DecodeEngine(model, max_len=16, decode_attention=True)
    assert model.config._attn_implementation.startswith("actsparse_") and builds_on(model)
    assert torch.equal(engine.generate(prompt, 8).tokens, plain)


def test_engine_refuses_the_kernel_on_a_device_without_one():
    with pytest.raises(ActSparseError, match="decode attention kernel runs on cuda and cpu models; this one is on meta"):
        DecodeEngine(tiny_model("llama").to("meta"), max_len=16, decode_attention=True)
