"""The Triton implementation of `actsparse::decode_attention` (`ops.py`), registered for CUDA tensors.

`register()` (run on import) makes it the op's "cuda" kernel; `register("cpu")` its CPU kernel
too, for testing under ``TRITON_INTERPRET=1`` (with the C++ kernels set aside by
`cpu_ops.unregister()`; `cpu_ops.register()` puts them back). The (Hq / Hkv) * Q queries of a KV
head share one program, at most MAX_ROWS of them, reading each cached key and value once (no `repeat_kv` copy); longer query blocks
(prefill) are not what it is for. Launch configurations are tuned per shape (`tuning.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import ops, tuning
from .attention_kernels import attention_combine_kernel, decode_attention_kernel
from .ops import ATTENTION_MAX_HEAD_DIM as MAX_HEAD_DIM
from .ops import ATTENTION_MAX_ROWS as MAX_ROWS
from .triton_ops import dependent_launch


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


def check_kernel_limits(query, key) -> None:
    """Raise ValueError where a valid `decode_attention` call exceeds this kernel's limits."""
    heads, q_len, head_dim = query.shape[1:]
    if (heads // key.shape[1]) * q_len > MAX_ROWS or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: {heads // key.shape[1]} query heads per KV head x {q_len} positions "
                         f"(at most {MAX_ROWS}) and head size {head_dim} (at most {MAX_HEAD_DIM})")


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor], scale: float, softcap: float
) -> torch.Tensor:
    ops.check_decode_attention(query, key, value, mask)
    check_kernel_limits(query, key)
    batch, heads, q_len, head_dim = query.shape
    out = torch.empty((batch, q_len, heads, head_dim), dtype=query.dtype, device=query.device)
    mask_kind = None if mask is None else (mask.dtype, tuple(s == 1 for s in mask.shape))
    key_ = ("attention", batch, heads, key.shape[1], q_len, key.shape[2], head_dim, query.dtype, mask_kind, softcap > 0)
    args = (query, key, value, mask, scale, softcap)
    cfg = tuning.choose(key_, attention_candidates(key.shape[2], query.device),
                        lambda c: launch_decode_attention(*args, c, out), query.device)
    launch_decode_attention(*args, cfg, out)
    return out


def register(device_type: str = "cuda") -> None:
    """Make the Triton kernel the `device_type` implementation of `actsparse::decode_attention`."""
    ops.decode_attention.register_kernel(device_type, decode_attention)


register()
