"""The vLLM plugin's layer plans (no vLLM needed): a merged q/k/v or gate/up linear computed from the
saved state equals actsparse's own modules, through the torch reference and the CPU kernels."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import actsparse as asp
from actsparse.errors import ActSparseError
from actsparse.runtime import use_kernels
from actsparse.vllm_plugin.plan import LayerPlan, Meter
from actsparse.vllm_plugin.state import read_state
from tiny import CALIB, tiny_model

PREFIX = "model.layers.1"


def _sparse(config, tweak=None):
    model = asp.sparsify_(tiny_model("llama"), config, CALIB)
    if tweak is not None:
        tweak(model)
    return model


def _plans(state, layer, kernels: bool):
    """The plans vLLM's Llama layer gets: merged q/k/v and gate/up, o and down on their own."""
    attn, mlp = layer.self_attn, layer.mlp
    q, k, v, o = (f"{PREFIX}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate_name, up_name, down_name = (f"{PREFIX}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj"))
    gate = state.gates.get(f"{PREFIX}.mlp")
    built = {
        "qkv": (LayerPlan.build([attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features],
                                [state.selection(n) for n in (q, k, v)]),
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
        "o": (LayerPlan.build([attn.o_proj.out_features], [state.selection(o)]), attn.o_proj.weight),
        "gate_up": (LayerPlan.build([mlp.gate_proj.out_features] * 2, [state.selection(gate_name), state.selection(up_name)],
                                    gate, F.silu),
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
        "down": (LayerPlan.build([mlp.down_proj.out_features], [state.selection(down_name)], zero_skip=gate is not None),
                 mlp.down_proj.weight),
    }
    for plan, weight in built.values():
        plan.prepare(weight.detach(), kernels)
    return built


def _vllm_mlp(plans, x):
    plan, weight = plans["gate_up"]
    g, u = plan.forward(x, weight, None).chunk(2, dim=-1)
    plan, weight = plans["down"]
    return plan.forward(F.silu(g) * u, weight, None)  # vLLM's SiluAndMul


def _set_k_threshold(model):
    """q/k/v with different thresholds: the merged layer needs one run per selection."""
    k = model.model.layers[1].self_attn.k_proj
    k.set_threshold(float(k.threshold) * 2, k.target)


CASES = {
    "teal": (asp.TealConfig(sparsity=0.5), None),
    "teal, k apart": (asp.TealConfig(sparsity=0.5), _set_k_threshold),
    "wina": (asp.WinaConfig(sparsity=0.5), None),
    "cats": (asp.CatsConfig(sparsity=0.5), None),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tokens", [3, 12])  # a decode batch (kernels) and a prefill (torch)
@pytest.mark.parametrize("kernels", [False, True])
def test_merged_layers_compute_what_actsparse_modules_do(tmp_path, case, tokens, kernels):
    model = _sparse(*CASES[case])
    state = read_state(asp.save(model, tmp_path / "out"))
    use_kernels(model, kernels)
    layer = model.model.layers[1]
    plans = _plans(state, layer, kernels)
    x = torch.randn(tokens, layer.self_attn.q_proj.in_features)
    attn = layer.self_attn
    with torch.no_grad():
        expected = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        plan, weight = plans["qkv"]
        torch.testing.assert_close(plan.forward(x, weight, None), expected, rtol=1e-5, atol=1e-5)
        plan, weight = plans["o"]
        torch.testing.assert_close(plan.forward(x, weight, None), attn.o_proj(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_vllm_mlp(plans, x), layer.mlp(x), rtol=1e-5, atol=1e-5)
    if case == "teal, k apart":
        assert len(plans["qkv"][0].runs) == 3  # q, k, v: only neighbours with one selection share a run
    elif case == "teal":
        assert len(plans["qkv"][0].runs) == 1


def test_meter_counts_what_the_selection_drops(tmp_path):
    model = _sparse(asp.CatsConfig(sparsity=0.5))
    state = read_state(asp.save(model, tmp_path / "out"))
    plans = _plans(state, model.model.layers[1], kernels=False)
    plans["gate_up"][0].meter = meter = Meter()
    x = torch.randn(40, 64)
    with torch.no_grad():
        _vllm_mlp(plans, x)
    g = F.linear(x, model.model.layers[1].mlp.gate_proj.weight)
    expected = int((F.silu(g).abs() <= state.gates[f"{PREFIX}.mlp"].threshold).sum())
    assert (meter.gate_masked, meter.gate_total) == (expected, g.numel())
    assert 0.3 < meter.gate_masked / meter.gate_total < 0.7


@pytest.mark.parametrize("config, what", [
    (asp.LaRoSAConfig(sparsity=0.5), "a rotation (LaRoSA)"),
    (asp.RSparseConfig(sparsity=0.5), "a low-rank term (R-Sparse)"),
    (asp.TealConfig(sparsity=0.5, selection="topk"), "top-K selection"),
])
def test_state_the_plugin_cannot_apply_is_refused_by_name(tmp_path, config, what):
    out = asp.save(asp.sparsify_(tiny_model("llama"), config, CALIB), tmp_path / "out")
    with pytest.raises(ActSparseError, match=f"{config.method} directory: .* has {re.escape(what)}"):
        read_state(out)
