"""LaRoSA: top-K on activations rotated into the eigenbasis of their covariance.

Per decoder layer, the attention input and the MLP input (the outputs of the norms before them)
are rotated by the eigenvectors Q of their damped uncentred fp64 covariance. The rotation is real,
not simulated: the norm becomes a `RotatedNorm` returning ``h Q`` and Q is folded into q/k/v
(or qkv) and gate/up (or gate_up), ``W' = W Q``. The PCA basis packs the activation's energy into
few coordinates, so top-K drops less of it than top-K on the raw activation. o and down read
unrotated inputs (rotating them would cost a full extra matrix per token) and take more sparsity,
by default through TEAL's calibrated thresholds (`unrotated_selection`), by top-K in the paper.

Cost outside sparsity.model: each rotation reads d^2 weights per token; the recipe reports it as
`rotation_reads` (a fraction of the dense linear reads).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..calibrate import Covariance, Observer, column_norms, run_calibration, topk_count
from ..config import LaRoSAConfig
from ..errors import ActSparseError
from ..models import iter_linears
from ..rotation import (attention_heads, eigenbasis, final_norm, norm_consumers,
                        rotate_heads_, rotate_norm_output_, rotate_residual_, scale_free_norm_)
from . import register
from .allocation import greedy_from_config
from .search import role_targets, score_histograms


ROTATED_ROLES = ("q", "k", "v", "qkv", "gate", "up", "gate_up")
UNROTATED_ROLES = ("o", "down")
PROBE_TOKENS = 16  # length of the forward pass that finds the norms and checks the fold


@register(LaRoSAConfig)
def apply_larosa(model, specs, config: LaRoSAConfig, calibration) -> dict:
    named = {name: (role, module) for name, role, module in iter_linears(specs, model)}
    linears = {n: m for n, (_, m) in named.items()}
    roles = {n: r for n, (r, _) in named.items()}
    rotated_roles = ROTATED_ROLES + (("o",) if config.head_rotation else ())
    coefficients = {r: config.rotated_coefficient if r in rotated_roles else config.unrotated_coefficient
                    for r in ROTATED_ROLES + UNROTATED_ROLES}
    targets = role_targets(config, roles, {n: m.weight.numel() for n, m in linears.items()}, coefficients)
    active = [n for n, s in targets.items() if s]
    if not active:
        return {"allocation": {}, "rotated": [], "rotated_heads": []}

    groups = {}
    for spec in specs:
        names = spec.linear_names()
        attn = [names[r] for r in ("q", "k", "v", "qkv") if r in names]
        mlp = [names[r] for r in ("gate", "up", "gate_up") if r in names]
        for label, members in ((f"{spec.prefix}:attn", attn), (f"{spec.prefix}:mlp", mlp)):
            if any(targets[n] for n in members):
                groups[label] = members
    probe = calibration[:1, :PROBE_TOKENS]
    consumers = norm_consumers(model, specs, groups, probe) if groups else {}

    residual = config.rotation == "residual" and bool(consumers)
    if residual:  # one basis for the whole stream: the pooled second moment of the normalised norm inputs
        pooled = Covariance(linears[next(iter(consumers.values()))[0]].in_features)
        covariances = {}
        observers = [Observer(n, lambda x: pooled.update(_normalised(x))) for n in consumers]
    else:
        covariances = {norm: Covariance(linears[names[0]].in_features) for norm, names in consumers.items()}
        observers = [Observer(n, c.update, on="output") for n, c in covariances.items()]
    head_covariances = {}
    if config.head_rotation:
        for spec in specs:
            o_name = spec.linear_names()["o"]
            if targets[o_name]:
                heads, kv_heads, head_dim = attention_heads(model, spec)
                head_covariances[spec.index] = [Covariance(head_dim) for _ in range(kv_heads)]
                observers.append(Observer(o_name, _per_head(head_covariances[spec.index], heads, head_dim)))
    run_calibration(model, calibration, observers, desc="larosa: covariances")
    with torch.no_grad():
        reference = model(input_ids=probe.to(next(model.parameters()).device), use_cache=False).logits.float()
    device = reference.device  # eigendecompositions and folds in fp64 where the model is, one at a time
    if residual:
        head_norm = final_norm(model, probe)
        gains = {n: scale_free_norm_(model.get_submodule(n), n) for n in [*consumers, head_norm]}
        rotate_residual_(model, specs, consumers, head_norm, gains,
                         eigenbasis(pooled.xtx, pooled.tokens, config.damping, device)[1])
    for norm, names in tqdm([] if residual else list(consumers.items()), desc="larosa: eigenbases + folds",
                            unit="norm", leave=False):
        cov = covariances.pop(norm)
        _, q = eigenbasis(cov.xtx, cov.tokens, config.damping, device)
        rotate_norm_output_(model, norm, [linears[n] for n in names], q)
    for index, per_group in tqdm(list(head_covariances.items()), desc="larosa: head rotations", unit="layer", leave=False):
        rotate_heads_(model, specs[index],
                      torch.stack([eigenbasis(c.xtx, c.tokens, config.damping, device)[1] for c in per_group]))
    fold_error = check_fold(model, probe, reference, len(specs))

    scales = {n: column_norms(linears[n].weight).to(linears[n].weight.device) if config.score == "wina" else None
              for n in active}

    def install_topk(name: str, sparsity: float) -> None:
        module = linears[name]
        if sparsity <= 0:
            module.set_dense()
        else:
            module.set_topk(topk_count(module.in_features, sparsity), sparsity, scales[name])

    if config.allocation == "greedy":
        targets = greedy_from_config(model, specs, config, calibration, {n: config.sparsity_for(n) for n in active},
                                     install_topk)
    for n in active:  # top-K at the targets: the method itself, or the start of threshold calibration
        install_topk(n, targets[n])
    unrotated_selection = config.unrotated_selection or config.selection
    thresholded = [n for n in active if targets[n] > 0 and
                   (unrotated_selection if roles[n] not in rotated_roles else config.selection) == "threshold"]
    if thresholded:
        if not config.recalibrate:  # the paper's convention: scores of the dense (rotated) model
            for n in active:
                linears[n].set_dense()
        hists = score_histograms(model, calibration, {n: scales[n] for n in thresholded}, "larosa: thresholds")
        if not config.recalibrate:
            for n in active:
                install_topk(n, targets[n])
        for n in thresholded:
            linears[n].set_threshold(hists[n].quantile(targets[n]), targets[n], scales[n])

    dense_reads = sum(m.weight.numel() for m in linears.values())
    rotation_reads = 0 if residual else sum(linears[names[0]].in_features ** 2 for names in consumers.values())
    return {
        "allocation": {n: targets[n] for n in active},
        "rotation": config.rotation,
        "rotated": sorted(consumers),
        "rotated_heads": sorted(specs[i].attn_prefix for i in head_covariances),
        "rotation_reads": rotation_reads / dense_reads,
        "fold_error": fold_error,
    }


def _normalised(x: torch.Tensor) -> torch.Tensor:
    """x / rms(x): what an RMS norm without gain makes of the residual stream."""
    x = x.double()
    return x * x.pow(2).mean(-1, keepdim=True).clamp_min(1e-30).rsqrt()


def _per_head(covariances: list[Covariance], heads: int, head_dim: int):
    """Observer of o_proj's input that accumulates each value head's output covariance."""
    kv_heads = len(covariances)

    def update(x: torch.Tensor) -> None:
        x = x.reshape(-1, kv_heads, heads // kv_heads, head_dim)
        for g, cov in enumerate(covariances):
            cov.update(x[:, g])

    return update


def fold_tolerance(dtype: torch.dtype, layers: int) -> float:
    """The relative logit error (||delta|| / ||logits||) that rounding alone may cause: the folded
    weights and the rotation are each rounded once to `dtype`, so the error grows with its epsilon
    and, as independent roundings add up over the decoder, with the square root of the depth.
    Measured on SmolLM2-135M (30 layers), folded correctly: 2.0e-2 in bf16, 1.8e-3 in fp16, about
    0.45 eps sqrt(L); one consumer left unrotated: 0.19 (its first layer) to 1.3 (its last), bf16."""
    return max(1e-4, 2.0 * torch.finfo(dtype).eps * layers**0.5)


@torch.no_grad()
def check_fold(model, probe: torch.Tensor, reference: torch.Tensor, layers: int) -> float:
    """The folded model, still dense, must give the unrotated logits up to rounding; returns the
    relative error it measured."""
    logits = model(input_ids=probe.to(reference.device), use_cache=False).logits.float()
    error = float((logits - reference).norm() / reference.norm().clamp_min(1e-30))
    dtype = next(model.parameters()).dtype
    tolerance = fold_tolerance(dtype, layers)
    if error > tolerance:
        raise ActSparseError(
            f"folding the rotations changed the dense model's logits (relative error {error:.2e}, rounding in "
            f"{str(dtype).removeprefix('torch.')} allows {tolerance:.2e}); some module reads a rotated norm output "
            f"without the rotation folded in ({type(model).__name__})"
        )
    return error
