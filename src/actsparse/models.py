"""The one place that knows architectures.

A gated-MLP decoder layer is found by structure: an attention module holding input projections
(q/k/v or a fused qkv) and an output projection, and an MLP holding gate/up (or a fused gate_up),
down and an activation. The small tables below name the attributes the supported families use;
nothing here copies a modeling file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import ActSparseError

def _linear_types() -> tuple[type, ...]:
    from .nn import SparseLinear

    return (nn.Linear, SparseLinear)


SUPPORTED = "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text), Phi-3"

_ATTN = ("self_attn", "attention", "attn")
_Q, _K, _V, _QKV = ("q_proj",), ("k_proj",), ("v_proj",), ("qkv_proj",)
_O = ("o_proj", "dense", "out_proj")
_MLP = ("mlp", "feed_forward")
_GATE, _UP, _GATE_UP, _DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("gate_up_proj",), ("down_proj", "w2")
_ACT = ("act_fn", "activation_fn", "act")


@dataclass
class LayerSpec:
    """Where the pieces of one decoder layer live (names relative to the model root)."""

    index: int
    prefix: str  # e.g. "model.layers.3"
    layer: nn.Module
    attn: nn.Module
    attn_prefix: str
    attn_inputs: dict[str, str]  # role ("q", "k", "v" or "qkv") -> attribute name on attn
    attn_output: str  # attribute name on attn
    mlp: nn.Module
    mlp_prefix: str
    mlp_attr: str  # attribute name of the MLP on the layer
    gate: str | None  # attribute names on the MLP
    up: str | None
    gate_up: str | None
    down: str
    act: Callable[[torch.Tensor], torch.Tensor]

    def linear_names(self) -> dict[str, str]:
        """Full module names of every linear in the layer, keyed by role."""
        names = {role: f"{self.attn_prefix}.{attr}" for role, attr in self.attn_inputs.items()}
        names["o"] = f"{self.attn_prefix}.{self.attn_output}"
        for role, attr in (("gate", self.gate), ("up", self.up), ("gate_up", self.gate_up), ("down", self.down)):
            if attr is not None:
                names[role] = f"{self.mlp_prefix}.{attr}"
        return names

    def shared_inputs(self) -> list[tuple[str, ...]]:
        """Full names of the linears that read one input, group by group (q/k/v, gate/up)."""
        names = self.linear_names()
        return [tuple(names[r] for r in roles) for roles in (("q", "k", "v"), ("gate", "up"))
                if all(r in names for r in roles)]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of layers and its name, for any causal LM that exposes them."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            candidates.append((name, module))
    if not candidates:
        raise ActSparseError(
            f"{type(model).__name__}: no decoder layer list (a ModuleList named '*layers') was found; "
            f"supported families: {SUPPORTED}"
        )
    return max(candidates, key=lambda c: len(c[1]))


def layer_specs(model: nn.Module) -> list[LayerSpec]:
    prefix, layers = decoder_layers(model)
    return [_layer_spec(i, f"{prefix}.{i}", layer, model) for i, layer in enumerate(layers)]


def _first(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def _layer_spec(index: int, prefix: str, layer: nn.Module, model: nn.Module) -> LayerSpec:
    where = f"{type(model).__name__} layer {index} ({type(layer).__name__})"
    attn_attr = _first(layer, _ATTN)
    if attn_attr is None:
        raise ActSparseError(f"{where}: no attention module (looked for {', '.join(_ATTN)})")
    attn = getattr(layer, attn_attr)
    if _first(attn, _QKV):
        attn_inputs = {"qkv": _first(attn, _QKV)}
    else:
        found = {role: _first(attn, names) for role, names in (("q", _Q), ("k", _K), ("v", _V))}
        missing = [r for r, a in found.items() if a is None]
        if missing:
            raise ActSparseError(
                f"{where}: attention {type(attn).__name__} has no {'/'.join(missing)} projection "
                f"(looked for q_proj/k_proj/v_proj or qkv_proj)"
            )
        attn_inputs = found
    attn_output = _first(attn, _O)
    if attn_output is None:
        raise ActSparseError(f"{where}: attention {type(attn).__name__} has no output projection ({', '.join(_O)})")

    mlp_attr = _first(layer, _MLP)
    if mlp_attr is None:
        raise ActSparseError(f"{where}: no MLP module (looked for {', '.join(_MLP)})")
    mlp = getattr(layer, mlp_attr)
    gate_up = _first(mlp, _GATE_UP)
    gate = None if gate_up else _first(mlp, _GATE)
    up = None if gate_up else _first(mlp, _UP)
    down = _first(mlp, _DOWN)
    act_attr = _first(mlp, _ACT)
    if down is None or act_attr is None or not (gate_up or (gate and up)):
        raise ActSparseError(
            f"{where}: MLP {type(mlp).__name__} is not a gated MLP (needs gate_proj+up_proj or "
            f"gate_up_proj, down_proj and an activation module); supported families: {SUPPORTED}"
        )
    LINEAR_TYPES = _linear_types()
    for owner, attr in [(attn, a) for a in attn_inputs.values()] + [(attn, attn_output)] + [
        (mlp, a) for a in (gate, up, gate_up, down) if a
    ]:
        if not isinstance(getattr(owner, attr), LINEAR_TYPES):
            raise ActSparseError(f"{where}: {attr} is a {type(getattr(owner, attr)).__name__}, not nn.Linear")
    return LayerSpec(
        index=index,
        prefix=prefix,
        layer=layer,
        attn=attn,
        attn_prefix=f"{prefix}.{attn_attr}",
        attn_inputs=attn_inputs,
        attn_output=attn_output,
        mlp=mlp,
        mlp_prefix=f"{prefix}.{mlp_attr}",
        mlp_attr=mlp_attr,
        gate=gate,
        up=up,
        gate_up=gate_up,
        down=down,
        act=getattr(mlp, act_attr),
    )


def iter_linears(specs: list[LayerSpec], model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(full name, role, module) for every decoder linear, in layer order."""
    for spec in specs:
        for role, name in spec.linear_names().items():
            yield name, role, model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
