"""Triton kernels for decode attention over a KV cache, grouped-query aware (split-KV "flash decoding").

One program per (sequence, KV head, KV split) holds the queries of every query head that shares its
KV head (the `groups` heads times the query positions, padded to a `tl.dot` tile), so each key and
value is read once for the whole group instead of once per query head as a `repeat_kv` copy would.
It walks its split of the cache in blocks with an online softmax; a block that no query may attend
(per the mask: the unfilled tail of a static cache) is not read. With one split the program
normalises and stores the output; with several it stores its running max, sum and unnormalised
output to a fp32 workspace and `attention_combine_kernel` merges the splits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import wait_for_producer


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stats_ptr,
    kv_heads, groups, q_len, kv_len, split_len, scale, softcap,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, smb, smh, sms, sml, sob, sos, soh, sod,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_producer()
    seq_head = tl.program_id(0)
    split = tl.program_id(1)
    b = seq_head // kv_heads
    kv_head = seq_head % kv_heads
    rows = tl.arange(0, BM)
    group = rows // q_len
    pos = rows % q_len
    row_ok = rows < groups * q_len
    head = kv_head * groups + group
    dims = tl.arange(0, BD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + pos[:, None] * sqs + dims[None, :] * sqd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    row_max = tl.full([BM], float("-inf"), tl.float32)
    row_sum = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    start = split * split_len
    stop = tl.minimum(start + split_len, kv_len)
    for block in range(start, stop, BL):
        keys = block + tl.arange(0, BL)
        key_ok = keys < stop
        attend = row_ok[:, None] & key_ok[None, :]
        if HAS_MASK:
            m = tl.load(mask_ptr + b * smb + head[:, None] * smh + pos[:, None] * sms + keys[None, :] * sml,
                        mask=attend, other=0)
            if BOOL_MASK:
                attend = attend & (m != 0)
        if tl.max(attend.to(tl.int32)) > 0:
            k = tl.load(k_ptr + b * skb + kv_head * skh + keys[:, None] * sks + dims[None, :] * skd,
                        mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            if SOFTCAP:
                e = tl.exp(-2.0 * tl.abs(s) / softcap)  # softcap * tanh(s / softcap), without overflow
                s = softcap * tl.where(s < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
            if HAS_MASK and not BOOL_MASK:
                s = s + tl.maximum(m.to(tl.float32), -1e30)  # finfo.min masks: no overflow below
            s = tl.where(attend, s * 1.4426950408889634, float("-inf"))  # exp2 units
            new_max = tl.maximum(row_max, tl.max(s, 1))
            base = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing to attend yet
            p = tl.exp2(s - base[:, None])
            alpha = tl.exp2(row_max - base)
            v = tl.load(v_ptr + b * svb + kv_head * svh + keys[:, None] * svs + dims[None, :] * svd,
                        mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            row_sum = row_sum * alpha + tl.sum(p, 1)
            row_max = new_max
    if SPLIT:
        # Partials [seq_head, split, BM, BD] and stats [seq_head, split, 2, BM] (max in log2 units, sum).
        where = (seq_head * tl.num_programs(1) + split)
        tl.store(part_ptr + where * BM * BD + rows[:, None] * BD + dims[None, :], acc)
        tl.store(stats_ptr + where * 2 * BM + rows, row_max)
        tl.store(stats_ptr + where * 2 * BM + BM + rows, row_sum)
    else:
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]  # a query with nothing to attend gives 0
        tl.store(out_ptr + b * sob + pos[:, None] * sos + head[:, None] * soh + dims[None, :] * sod,
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def attention_combine_kernel(
    part_ptr, stats_ptr, out_ptr, kv_heads, groups, q_len, splits,
    sob, sos, soh, sod,
    HEAD_DIM: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, PDL: tl.constexpr,
):
    """Merge the KV splits of one (sequence, KV head): out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s."""
    if PDL:
        wait_for_producer()
    seq_head = tl.program_id(0)
    b = seq_head // kv_heads
    kv_head = seq_head % kv_heads
    rows = tl.arange(0, BM)
    row_ok = rows < groups * q_len
    head = kv_head * groups + rows // q_len
    pos = rows % q_len
    dims = tl.arange(0, BD)
    dim_ok = dims < HEAD_DIM
    splits_ = tl.arange(0, BS)
    split_ok = splits_ < splits
    stats = stats_ptr + (seq_head * splits + splits_[:, None]) * 2 * BM + rows[None, :]
    maxes = tl.load(stats, mask=split_ok[:, None], other=float("-inf"))  # [BS, BM]
    sums = tl.load(stats + BM, mask=split_ok[:, None], other=0.0)
    top = tl.max(maxes, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(maxes - top[None, :])  # [BS, BM]
    total = tl.sum(weight * sums, 0)
    acc = tl.zeros([BM, BD], tl.float32)
    for s in range(0, splits):
        w = tl.sum(tl.where(splits_[:, None] == s, weight, 0.0), 0)
        acc += w[:, None] * tl.load(part_ptr + (seq_head * splits + s) * BM * BD + rows[:, None] * BD + dims[None, :])
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + b * sob + pos[:, None] * sos + head[:, None] * soh + dims[None, :] * sod,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
