"""actsparse's decode attention kernel as a transformers attention implementation.

`use_decode_attention(model)` registers, through transformers' `AttentionInterface` and
`AttentionMaskInterface`, an implementation named ``actsparse_<base>`` (base: the model's own,
"sdpa" or "eager") and switches the model to it. A decode step's attention (few queries per KV
head, on CUDA or on the CPU) runs `actsparse::decode_attention` (Triton on CUDA, C++ on the CPU),
which reads each cached key and value once per KV head instead of copying them per query head
(`repeat_kv`), and on the CPU only the cache positions the mask keeps; everything else (prefill,
training with dropout, attention sinks) runs the base implementation, with the base's own masks,
unchanged.
"""
from __future__ import annotations

import importlib

import torch

from .errors import ActSparseError
from .kernels import load_kernels, ops

PREFIX = "actsparse_"
BASES = ("sdpa", "eager")


def decode_attention_name(base: str) -> str:
    return PREFIX + base


def builds_on(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention is one `use_decode_attention` builds on (or already uses it)."""
    return model.config._attn_implementation.removeprefix(PREFIX) in BASES


def use_decode_attention(model: torch.nn.Module) -> str:
    """Switch `model` (a transformers model whose attention is "sdpa" or "eager") to the decode
    attention kernel for decode steps; returns the implementation's name."""
    base = model.config._attn_implementation
    if base.startswith(PREFIX):
        return base
    if base not in BASES:
        raise ActSparseError(f"decode attention builds on the {' or '.join(BASES)} attention implementations; "
                             f"this model uses {base!r} (set attn_implementation='sdpa', or decode_attention=False)")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError as e:
        raise ActSparseError(f"decode attention needs transformers' attention and mask interfaces ({e})") from None
    load_kernels(next(model.parameters()).device)
    name = decode_attention_name(base)
    AttentionInterface.register(name, _decode_attention_forward(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)
    return name


def _base_forward(base: str, module: torch.nn.Module):
    if base == "eager":  # every transformers modeling file defines its model's eager attention
        forward = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
        if forward is None:
            raise ActSparseError(f"{type(module).__module__} has no eager_attention_forward for the non-decode steps")
        return forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def _decode_attention_forward(base: str):
    def forward(module, query, key, value, attention_mask, **kwargs):
        if _takes_kernel(query, key, attention_mask, kwargs):
            scaling = kwargs.get("scaling")
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return ops.decode_attention(query, key, value, attention_mask, scale, kwargs.get("softcap") or 0.0), None
        return _base_forward(base, module)(module, query, key, value, attention_mask, **kwargs)

    return forward


def _takes_kernel(query, key, mask, kwargs) -> bool:
    return ((query.shape[1] // key.shape[1]) * query.shape[2] <= ops.ATTENTION_MAX_ROWS
            and query.shape[-1] <= ops.ATTENTION_MAX_HEAD_DIM
            and not kwargs.get("dropout") and kwargs.get("s_aux") is None and kwargs.get("sinks") is None
            # no mask on a query block means causal (SDPA's is_causal): only one query reads all keys then
            and (mask.dim() == 4 if mask is not None else query.shape[2] == 1))
