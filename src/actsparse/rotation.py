"""Orthogonal rotations folded into a model (LaRoSA).

For a norm whose output h feeds some linears, `rotate_norm_output_` replaces the norm by a
`RotatedNorm` that returns ``h Q`` (the row-vector form of x' = Q^T h) and folds Q into every
consumer, ``W' = W Q``, so that ``W' x' = W h``: one d x d rotation per distinct input instead of
one per linear. Which norm feeds which linears is found from the data flow of one short forward
pass (`norm_consumers`), not from names, and the fold is checked against the unrotated logits.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ActSparseError
from .models import LayerSpec, set_submodule


class RotatedNorm(nn.Module):
    """``norm(x) @ rotation``: the normalised activation expressed in an orthonormal basis."""

    WRAPS = "norm"  # io saves the wrapped norm under its original parameter names

    def __init__(self, norm: nn.Module, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("rotation", torch.empty(dim, dim, dtype=dtype, device=device))

    @property
    def dim(self) -> int:
        return self.rotation.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return torch.matmul(h, self.rotation.to(h.dtype))

    def spec(self) -> dict:
        return {"kind": "RotatedNorm", "dim": self.dim}

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def restore_rotated_norm(model: nn.Module, name: str, spec: dict) -> None:
    """io's restore: wrap the freshly loaded norm; its rotation is loaded afterwards."""
    norm = model.get_submodule(name)
    weight = next(model.parameters())
    set_submodule(model, name, RotatedNorm(norm, int(spec["dim"]), dtype=weight.dtype, device=weight.device))


@torch.no_grad()
def norm_consumers(model: nn.Module, specs: list[LayerSpec], groups: dict[str, list[str]], tokens: torch.Tensor) -> dict[str, list[str]]:
    """{norm module name: consumer linear names} for each group of linears that read one input.

    `groups` maps a label to linears that share their input (e.g. q/k/v). One forward pass records
    which direct child of each decoder layer produced the very tensor those linears receive."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    received: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for spec in specs:
            for child_name, child in spec.layer.named_children():
                if child is spec.attn or child is spec.mlp:
                    continue
                full = f"{spec.prefix}.{child_name}"
                handles.append(child.register_forward_hook(
                    lambda m, a, out, n=full: produced.__setitem__(id(out), (n, out)) if torch.is_tensor(out) else None))
        for label, names in groups.items():
            handles.append(model.get_submodule(names[0]).register_forward_pre_hook(
                lambda m, a, label=label: received.setdefault(label, a[0])))
        model(input_ids=tokens.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    consumers: dict[str, list[str]] = {}
    for label, names in groups.items():
        source = produced.get(id(received.get(label)))
        if source is None:
            raise ActSparseError(
                f"{names[0]}: its input is not the output of a norm module of its decoder layer, so no "
                f"rotation can be folded before it ({type(model).__name__})"
            )
        consumers.setdefault(source[0], []).extend(names)
    return consumers


def eigenbasis(xtx: torch.Tensor, tokens: int, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, Q) of the damped uncentred covariance X^T X / n, in fp64."""
    h = xtx.double() / max(tokens, 1)
    h = h + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    values, vectors = torch.linalg.eigh(h)
    return values.flip(0), vectors.flip(1).contiguous()


@torch.no_grad()
def rotate_norm_output_(model: nn.Module, norm_name: str, consumers: list[nn.Linear], q: torch.Tensor) -> RotatedNorm:
    """Wrap the norm so it outputs ``h Q`` and fold ``W' = W Q`` into every consumer (in fp64)."""
    norm = model.get_submodule(norm_name)
    if isinstance(norm, RotatedNorm):
        raise ActSparseError(f"{norm_name} is already rotated")
    weight = consumers[0].weight
    q64 = q.to(device=weight.device, dtype=torch.float64)
    for linear in consumers:
        if linear.in_features != q.shape[0]:
            raise ActSparseError(f"rotation of size {q.shape[0]} does not fit {linear.in_features} input features")
        linear.weight.copy_((linear.weight.double() @ q64).to(linear.weight.dtype))
    wrapped = RotatedNorm(norm, q.shape[0], dtype=weight.dtype, device=weight.device)
    wrapped.rotation.copy_(q64.to(weight.dtype))
    set_submodule(model, norm_name, wrapped)
    return wrapped



def attention_heads(model: nn.Module, spec: LayerSpec) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of one layer's attention, from the config and o_proj."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    o = getattr(spec.attn, spec.attn_output)
    if o.in_features % heads or heads % kv_heads:
        raise ActSparseError(f"{spec.attn_prefix}: {heads} heads / {kv_heads} kv heads do not divide o_proj's {o.in_features} inputs")
    return heads, kv_heads, o.in_features // heads


def value_rows(spec: LayerSpec, heads: int, kv_heads: int, head_dim: int) -> tuple[nn.Module, slice]:
    """The linear that computes the values and the slice of its output rows that holds them."""
    if "qkv" in spec.attn_inputs:  # fused [q; k; v]
        start = (heads + kv_heads) * head_dim
        return getattr(spec.attn, spec.attn_inputs["qkv"]), slice(start, start + kv_heads * head_dim)
    return getattr(spec.attn, spec.attn_inputs["v"]), slice(0, kv_heads * head_dim)


@torch.no_grad()
def rotate_heads_(model: nn.Module, spec: LayerSpec, rotations: torch.Tensor) -> None:
    """Express each value head g in its own basis R_g: ``v'_g = R_g^T v_g`` (rows of v_proj) and
    ``W_o[:, j] <- W_o[:, j] R_g(j)`` for every query head j reading g. Attention mixes value vectors
    over tokens with scalar weights, so o_proj's input becomes ``R_g^T`` times the original head
    output and ``W_o' x' = W_o x``: nothing runs at inference."""
    heads, kv_heads, head_dim = attention_heads(model, spec)
    if rotations.shape != (kv_heads, head_dim, head_dim):
        raise ActSparseError(f"{spec.attn_prefix}: head rotations must be {kv_heads}x{head_dim}x{head_dim}, got {tuple(rotations.shape)}")
    v, rows = value_rows(spec, heads, kv_heads, head_dim)
    o = getattr(spec.attn, spec.attn_output)
    r = rotations.to(device=v.weight.device, dtype=torch.float64)
    group = heads // kv_heads
    wv = v.weight[rows].double().view(kv_heads, head_dim, -1)
    v.weight[rows] = torch.einsum("gij,gik->gjk", r, wv).reshape(kv_heads * head_dim, -1).to(v.weight.dtype)
    if v.bias is not None:
        bv = v.bias[rows].double().view(kv_heads, head_dim)
        v.bias[rows] = torch.einsum("gij,gi->gj", r, bv).reshape(-1).to(v.bias.dtype)
    wo = o.weight.double().view(o.out_features, heads, head_dim)
    per_head = r.repeat_interleave(group, dim=0)  # query head j reads kv head j // group
    o.weight.copy_(torch.einsum("ohi,hij->ohj", wo, per_head).reshape(o.out_features, -1).to(o.weight.dtype))
