"""Orthogonal rotations folded into a model (LaRoSA).

For a norm whose output h feeds some linears, `rotate_norm_output_` replaces the norm by a
`RotatedNorm` that returns ``h Q`` (the row-vector form of x' = Q^T h) and folds Q into every
consumer, ``W' = W Q``, so that ``W' x' = W h``: one d x d rotation per distinct input instead of
one per linear. Which norm feeds which linears is found from the data flow of one short forward
pass (`norm_consumers`), not from names, and the fold is checked against the unrotated logits.
"""
from __future__ import annotations

import copy

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


def eigenbasis(xtx: torch.Tensor, tokens: int, damping: float,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, Q) of the damped uncentred covariance X^T X / n, in fp64 on
    `device` (default: where `xtx` is; a 4096-wide fp64 eigendecomposition takes seconds on a
    CPU and well under one on a GPU)."""
    h = xtx.to(device=device or xtx.device, dtype=torch.float64) / max(tokens, 1)
    h = h + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
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


@torch.no_grad()
def final_norm(model: nn.Module, tokens: torch.Tensor) -> str:
    """Name of the module whose output the LM head reads (possibly through a slice of it, hence the
    match on storage), found from one forward pass's data flow."""
    head = model.get_output_embeddings()
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    received: list[torch.Tensor] = []
    def record(name: str, out) -> None:
        if torch.is_tensor(out):  # the first producer of a storage, not a pass-through after it
            produced.setdefault(out.untyped_storage().data_ptr(), (name, out))

    handles = [head.register_forward_pre_hook(lambda m, a: received.append(a[0]))]
    try:
        for name, module in model.named_modules():
            if name and module is not head and not list(module.children()):
                handles.append(module.register_forward_hook(lambda m, a, out, n=name: record(n, out)))
        model(input_ids=tokens.to(head.weight.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    name = produced.get(received[0].untyped_storage().data_ptr(), (None,))[0] if received else None
    if name is None:
        raise ActSparseError(f"{type(model).__name__}: the LM head's input is not the output of a final norm module")
    return name


@torch.no_grad()
def scale_free_norm_(norm: nn.Module, name: str) -> torch.Tensor:
    """Set an RMS norm's gain to the identity and return the per-channel gain it applied.

    The gain is read from the norm's own output on a vector of RMS 1, so both the ``w`` (Llama) and
    the ``1 + w`` (Gemma) parametrisations work: the identity is whichever of 1 and 0 makes the
    output uniform across channels."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or len(list(norm.parameters())) != 1:
        raise ActSparseError(f"{name} ({type(norm).__name__}): expected an RMS norm whose only parameter is a gain vector")
    ones = torch.ones(1, weight.numel(), dtype=weight.dtype, device=weight.device)
    before = norm(ones)[0].double()
    original = weight.detach().clone()
    for identity in (1.0, 0.0):
        weight.fill_(identity)
        after = norm(ones)[0].double()
        if after[0] > 0 and torch.allclose(after, after[0].expand_as(after), rtol=1e-6, atol=0):
            return before / after
    weight.copy_(original)
    raise ActSparseError(f"{name} ({type(norm).__name__}): no gain value of 1 or 0 makes it scale-free")


def _check_rotation_invariant(norm: nn.Module, name: str, q: torch.Tensor) -> None:
    # On a float64 copy: in bf16 the rounding alone is above any tolerance that still tells an RMS
    # norm from a LayerNorm.
    norm = copy.deepcopy(norm).double()
    device = next(norm.parameters()).device
    x = torch.randn(4, q.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    q = q.to(device, torch.float64)
    if not torch.allclose(norm(x @ q), norm(x) @ q, rtol=1e-3, atol=1e-4):
        raise ActSparseError(f"{name} ({type(norm).__name__}) does not commute with rotations (it is not an RMS norm), "
                             f"so the residual stream cannot be rotated; use rotation='per-layer'")


@torch.no_grad()
def rotate_residual_(model: nn.Module, specs: list[LayerSpec], consumers: dict[str, list[str]], head_norm: str,
                     gains: dict[str, torch.Tensor], q: torch.Tensor) -> None:
    """Express the whole residual stream in one basis Q (x' = x Q), absorbed into the weights.

    `gains` holds each norm's gain, already made scale-free by `scale_free_norm_`; an RMS norm
    without a gain commutes with Q, so the gain is folded into the norm's consumers
    (``W diag(g)``) and then every weight that reads the stream takes ``W Q`` (the layers' inputs
    and the LM head), every weight that writes it ``Q^T W`` (o and down, their biases ``b Q``), and
    the embedding ``E Q``. This is the residual-adapter form of LaRoSA with one basis for all layers,
    so the adapters are the identity and nothing runs at inference. A tied LM head is untied."""
    for spec in specs:
        known = {id(spec.attn), id(spec.mlp)} | {id(model.get_submodule(n)) for n in consumers if n.startswith(spec.prefix + ".")}
        for child_name, child in spec.layer.named_children():
            if id(child) not in known and any(True for _ in child.parameters()):
                raise ActSparseError(
                    f"{spec.prefix}.{child_name} ({type(child).__name__}) transforms a branch before it joins the "
                    f"residual stream (a post-norm), so the stream cannot be rotated with the weights alone; "
                    f"use rotation='per-layer'")
    for name in list(consumers) + [head_norm]:
        _check_rotation_invariant(model.get_submodule(name), name, q)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embedding.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    q64 = q.to(device=embedding.weight.device, dtype=torch.float64)

    def fold_in(linear: nn.Module, gain: torch.Tensor | None) -> None:
        w = linear.weight.double()
        if gain is not None:
            w = w * gain.to(w.device)
        linear.weight.copy_((w @ q64).to(linear.weight.dtype))

    for norm, names in consumers.items():
        for n in names:
            fold_in(model.get_submodule(n), gains[norm])
    fold_in(head, gains[head_norm])
    embedding.weight.copy_((embedding.weight.double() @ q64).to(embedding.weight.dtype))
    for spec in specs:
        names = spec.linear_names()
        for role in ("o", "down"):
            linear = model.get_submodule(names[role])
            linear.weight.copy_((q64.T @ linear.weight.double()).to(linear.weight.dtype))
            if linear.bias is not None:
                linear.bias.copy_((linear.bias.double() @ q64).to(linear.bias.dtype))
