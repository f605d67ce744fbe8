"""ProSparse at inference: the gate activation is ReLU and FATReLU masks its small outputs.

`relufy_` substitutes the activation: it writes ``relu`` into the Hugging Face config (so a saved
model reloads as a plain HF model with a ReLU MLP) and puts a ReLU module into every MLP. The
handler then sets FATReLU's threshold as the gate threshold of `SparseGatedMLP`, whose mask
``act(g) > t`` skips `up` rows and `down` columns; at t = 0 it computes exactly ReLU. Making the
ReLU outputs sparse is training's job (`actsparse.train`).
"""
from __future__ import annotations

from torch import nn

from ..config import ProSparseConfig
from ..errors import ActSparseError
from ..models import LayerSpec
from ..swap import swap_modules
from . import register

ACTIVATION_FIELDS = ("hidden_act", "hidden_activation")


def relufy_(model: nn.Module) -> list[LayerSpec]:
    """Swap the modules (idempotent) and make every MLP gate activation ReLU, config included."""
    from transformers.activations import ACT2FN

    config = model.config
    fields = [f for f in ACTIVATION_FIELDS if getattr(config, f, None) is not None]
    if not fields:
        raise ActSparseError(
            f"{type(config).__name__} names no MLP activation ({' or '.join(ACTIVATION_FIELDS)}); cannot ReLU-fy it"
        )
    for f in fields:
        setattr(config, f, "relu")
    specs = swap_modules(model)
    for spec in specs:
        spec.mlp.act_fn = ACT2FN["relu"]
        spec.act = spec.mlp.act_fn
    return specs


def set_fatrelu(specs: list[LayerSpec], config: ProSparseConfig, threshold: float) -> None:
    """FATReLU at `threshold` as the gate mask of every MLP that `config` does not ignore."""
    for spec in specs:
        if config.sparsity_for(f"{spec.mlp_prefix}.{spec.down}", default=0.0) is not None:
            spec.mlp.set_gate_threshold(threshold, 0.0)


@register(ProSparseConfig, calibrated=False)
def apply_prosparse(model, specs, config, calibration) -> dict:
    set_fatrelu(relufy_(model), config, config.threshold)
    return {"activation": "relu", "fatrelu_threshold": config.threshold}
