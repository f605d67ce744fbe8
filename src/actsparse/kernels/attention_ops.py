"""Decode attention as a `torch.library` custom op, with a fake implementation for tracing.

  actsparse::decode_attention(query[B,Hq,Q,D], key[B,Hkv,L,D], value[B,Hkv,L,D], mask?, scale,
                              softcap) -> out[B,Q,Hq,D]
      softmax(cap(scale * q k^T) + mask) v per query head, query head h reading KV head
      h // (Hq / Hkv) (grouped-query attention, no `repeat_kv` copy); `mask` broadcasts to
      [B,Hq,Q,L] and is boolean (True: attend) or additive; `softcap` > 0 applies
      softcap * tanh(s / softcap) first (Gemma 2). A query with no key to attend gives zeros.

For decoding: the (Hq / Hkv) * Q queries of a KV head share one program, at most MAX_ROWS of
them; longer query blocks (prefill) are not what it is for. Launch configurations are tuned per
shape (`tuning.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import tuning
from .attention_kernels import attention_combine_kernel, decode_attention_kernel
from .triton_ops import dependent_launch

MAX_ROWS = 64
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class AttentionConfig:
    block: int  # keys per loop step
    split: int  # keys per program; more keys than this run as several programs and a combine kernel
    num_warps: int
    num_stages: int


def attention_candidates(kv_len: int, device: torch.device) -> list[AttentionConfig]:
    if tuning.interpreting() or device.type != "cuda":
        return [AttentionConfig(32, 64, 4, 1)]
    whole = triton.next_power_of_2(kv_len)
    out = []
    for block in (32, 64):
        for split in sorted({min(s, max(whole, block)) for s in (64, 128, 256, 512, 1024, 2048)}):
            if split >= block:
                out.append(AttentionConfig(block, split, 4, 2))
    return out


def rows_tile(groups: int, q_len: int) -> int:
    return max(16, triton.next_power_of_2(groups * q_len))


def launch_decode_attention(query, key, value, mask, scale: float, softcap: float, cfg: AttentionConfig,
                            out: torch.Tensor) -> None:
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    bm, bd = rows_tile(groups, q_len), max(16, triton.next_power_of_2(head_dim))
    splits = triton.cdiv(kv_len, cfg.split)
    pdl = dependent_launch(query.device)
    if mask is not None:
        mask = mask.expand(batch, heads, q_len, kv_len)
    if splits > 1:
        part = torch.empty(batch * kv_heads * splits * bm * bd, dtype=torch.float32, device=query.device)
        stats = torch.empty(batch * kv_heads * splits * 2 * bm, dtype=torch.float32, device=query.device)
    else:
        part = stats = out
    decode_attention_kernel[(batch * kv_heads, splits)](
        query, key, value, mask if mask is not None else query, out, part, stats,
        kv_heads, groups, q_len, kv_len, cfg.split, scale, softcap,
        *query.stride(), *key.stride(), *value.stride(), *(mask.stride() if mask is not None else (0, 0, 0, 0)),
        *out.stride(),
        HEAD_DIM=head_dim, HAS_MASK=mask is not None, BOOL_MASK=mask is not None and mask.dtype == torch.bool,
        SOFTCAP=softcap > 0, SPLIT=splits > 1, IEEE=query.dtype == torch.float32, BM=bm, BL=cfg.block, BD=bd,
        PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
    )
    if splits > 1:
        attention_combine_kernel[(batch * kv_heads,)](
            part, stats, out, kv_heads, groups, q_len, splits, *out.stride(),
            HEAD_DIM=head_dim, BM=bm, BD=bd, BS=triton.next_power_of_2(splits), PDL=pdl,
            num_warps=4, launch_pdl=pdl,
        )


def check_decode_attention(query, key, value, mask) -> None:
    """Raise ValueError naming what `decode_attention` cannot take."""
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(f"decode_attention: query [B,Hq,Q,D] and key = value [B,Hkv,L,D], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    batch, heads, q_len, head_dim = query.shape
    if key.shape[0] != batch or key.shape[3] != head_dim or heads % key.shape[1]:
        raise ValueError(f"decode_attention: key {tuple(key.shape)} does not fit query {tuple(query.shape)} "
                         "(same batch and head size, query heads a multiple of KV heads)")
    if (heads // key.shape[1]) * q_len > MAX_ROWS or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: {heads // key.shape[1]} query heads per KV head x {q_len} positions "
                         f"(at most {MAX_ROWS}) and head size {head_dim} (at most {MAX_HEAD_DIM})")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"decode_attention: query, key and value of one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, (batch, heads, q_len, key.shape[2]))
        except RuntimeError:
            raise ValueError(f"decode_attention: mask {tuple(mask.shape)} does not broadcast to "
                             f"{(batch, heads, q_len, key.shape[2])}") from None
        if mask.dim() != 4 or not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise ValueError(f"decode_attention: a 4-d boolean or additive float mask, got {mask.dtype} {tuple(mask.shape)}")


@torch.library.custom_op("actsparse::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor], scale: float, softcap: float
) -> torch.Tensor:
    check_decode_attention(query, key, value, mask)
    batch, heads, q_len, head_dim = query.shape
    out = torch.empty((batch, q_len, heads, head_dim), dtype=query.dtype, device=query.device)
    mask_kind = None if mask is None else (mask.dtype, tuple(s == 1 for s in mask.shape))
    key_ = ("attention", batch, heads, key.shape[1], q_len, key.shape[2], head_dim, query.dtype, mask_kind, softcap > 0)
    args = (query, key, value, mask, scale, softcap)
    cfg = tuning.choose(key_, attention_candidates(key.shape[2], query.device),
                        lambda c: launch_decode_attention(*args, c, out), query.device)
    launch_decode_attention(*args, cfg, out)
    return out


@decode_attention.register_fake
def _(query, key, value, mask, scale, softcap):
    batch, heads, q_len, head_dim = query.shape
    return query.new_empty((batch, q_len, heads, head_dim))
