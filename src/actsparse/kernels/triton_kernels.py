"""Triton kernels for sparse decode: an input-sparse GEMV and an output-sparse row gather.

Input-sparse GEMV, ``y = x_kept @ Wt (+ bias) (+ lowrank_b @ z)`` with ``Wt = W.T`` stored
input-major, so that a kept input channel is one contiguous weight row:
  grid (column blocks, K splits). Two variants, chosen by the tuner: COMPACT programs first
  compact the kept rows of their K range into a private list (union over the batch) and loop
  over those only, ``(1 - s) * rows / BK`` iterations (PIPE: with the next block's weights
  loading while one block is accumulated); masked programs loop over every row block
  with the weight loads predicated on the kept rows, which pipeline like a dense GEMV's. Split-K
  partial sums go to a fp32 workspace; the last program of a column block to arrive (an arrival
  counter, reset by that program) adds them up and writes the output: one launch, no memset, no
  atomics on data. SPREAD (batch 1, a cooperative launch): every program of the column block
  waits for all partials, then sums a slice of the columns (whole gate/up group pairs when
  gated), so no one program reads them all.

Batches (BB > 1 tokens): DOT tiles run `tl.dot` with the batch padded to 16 rows; the others
keep one fp32 accumulator row per token and multiply each weight tile into every row on the
CUDA cores (faster for 2-4 tokens,
benchmarks/results/gpu_matrix/gpu_matrix_h200_2026-11-24_run23.json).

Gated (``ACT``): the gate and up columns of a fused ``[K, 2 * d_ff]`` weight interleaved in
groups, so that a column block holds both halves of its outputs and the epilogue stores the MLP
intermediate ``act(gate) * up`` instead of gate and up.

On Hopper and later both kernels are launched with programmatic dependent launch (PDL): a launch
and its programs' start overlap the previous kernel's tail, and `wait_for_producer` holds every
memory access until that kernel is done.

Output-sparse rows (CATS / ProSparse up projection), ``m = a_kept * (x @ Wup[rows].T)``:
  grid over row blocks of the output-major `up` weight; a row whose gate activation is masked is
  never loaded, and a block with no kept row returns after writing its zeros.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_producer():
    """Under programmatic dependent launch the programs start while the previous kernel still
    runs: wait for it before any global memory access (x, the workspace and the arrival counters
    may all be its to write), then let the next kernel begin launching."""
    gdc_wait()
    gdc_launch_dependents()


@triton.jit
def _accumulate(acc, rows, row_ok, x_ptr, scale_ptr, w_ptr, t, cols, col_ok, toks, tok_ok, B, stride_x, stride_w,
                HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, BB: tl.constexpr, DOT: tl.constexpr):
    """acc += x_kept[:, rows] @ W.T[rows, cols]; weight rows no token keeps are not loaded."""
    if BB == 1:
        xv = tl.load(x_ptr + rows, mask=row_ok, other=0.0)
        sv = tl.abs(xv.to(tl.float32))
        if HAS_SCALE:
            sv = sv * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        keep = (sv > t) & row_ok
        w = tl.load(
            w_ptr + rows.to(tl.int64)[:, None] * stride_w + cols[None, :],
            mask=keep[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first",
        )
        acc += w.to(tl.float32) * tl.where(keep, xv.to(tl.float32), 0.0)[:, None]
    else:
        xv = tl.load(x_ptr + toks[:, None] * stride_x + rows[None, :], mask=tok_ok[:, None] & row_ok[None, :], other=0.0)
        sv = tl.abs(xv.to(tl.float32))
        if HAS_SCALE:
            sv = sv * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[None, :]
        keep = (sv > t) & tok_ok[:, None] & row_ok[None, :]
        row_keep = tl.max(keep.to(tl.int32), axis=0) > 0
        w = tl.load(
            w_ptr + rows.to(tl.int64)[:, None] * stride_w + cols[None, :],
            mask=row_keep[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first",
        )
        if DOT:
            xk = tl.where(keep, xv, 0.0).to(w.dtype)
            if IEEE:
                acc = tl.dot(xk, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(xk, w, acc)
        else:
            acc = _accumulate_tokens(acc, w.to(tl.float32), rows, row_ok, x_ptr, scale_ptr, t, toks, B, stride_x,
                                     HAS_SCALE, BB)
    return acc


@triton.jit
def _accumulate_tokens(acc, w, rows, row_ok, x_ptr, scale_ptr, t, toks, B, stride_x,
                       HAS_SCALE: tl.constexpr, BB: tl.constexpr):
    """acc[b] += x_kept[b, rows] @ w for each token of a small batch, on the CUDA cores: the
    weight tile is read once for all BB tokens, and when the column block spans every thread
    (256 columns a warp in 16-bit) a token's sum over the tile's rows stays within each thread,
    with no layout change through shared memory (tl.dot pads the batch to 16 rows instead)."""
    for b in tl.static_range(BB):
        xb = tl.load(x_ptr + b * stride_x + rows, mask=row_ok & (tl.zeros_like(rows) + b < B), other=0.0).to(tl.float32)
        score = tl.abs(xb)
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        xk = tl.where(score > t, xb, 0.0)
        acc = tl.where(toks[:, None] == b, acc + tl.sum(w * xk[:, None], axis=0)[None, :], acc)
    return acc


@triton.jit
def input_sparse_gemv_kernel(
    x_ptr, scale_ptr, thr_ptr, w_ptr, bias_ptr, lrb_ptr, lrz_ptr, y_ptr,
    idx_ptr, part_ptr, count_ptr,
    B, K, N, R, rows_per_split, split_k,
    stride_x, stride_w, stride_y, stride_lrb, stride_lrz,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    USE_SPLIT: tl.constexpr, IEEE: tl.constexpr, COMPACT: tl.constexpr, PIPE: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CHUNK: tl.constexpr, BR: tl.constexpr, SC: tl.constexpr,
    ACT: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr, SPREAD: tl.constexpr, SS: tl.constexpr, SL: tl.constexpr,
    DOT: tl.constexpr,
):
    if PDL:
        wait_for_producer()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    toks = tl.arange(0, BB)
    tok_ok = toks < B
    t = tl.load(thr_ptr)
    k_lo = pid_k * rows_per_split
    k_hi = tl.minimum(k_lo + rows_per_split, K)
    if BB == 1:
        acc = tl.zeros([BK, BN], dtype=tl.float32)
    else:
        acc = tl.zeros([BB, BN], dtype=tl.float32)

    if COMPACT:
        # The kept rows of [k_lo, k_hi) (kept when any token keeps them) into a private list,
        # then a loop over those only: (1 - s) * rows / BK iterations.
        scratch = idx_ptr + (pid_n * split_k + pid_k).to(tl.int64) * rows_per_split
        n_active = 0
        for c in range(k_lo, k_hi, CHUNK):
            ks = c + tl.arange(0, CHUNK)
            k_ok = ks < k_hi
            xs = tl.load(x_ptr + toks[:, None] * stride_x + ks[None, :], mask=tok_ok[:, None] & k_ok[None, :], other=0.0)
            score = tl.abs(xs.to(tl.float32))
            if HAS_SCALE:
                score = score * tl.load(scale_ptr + ks, mask=k_ok, other=0.0)[None, :]
            keep = (score > t) & tok_ok[:, None] & k_ok[None, :]
            row_keep = tl.max(keep.to(tl.int32), axis=0)
            pos = n_active + tl.cumsum(row_keep, axis=0) - 1
            tl.store(scratch + pos, ks, mask=row_keep > 0)
            n_active += tl.sum(row_keep, axis=0)
        tl.debug_barrier()
        if BB == 1 and PIPE:
            # Software-pipelined by hand (Triton pipelines only loads that feed a dot): block
            # j + 1's weights and block j + 2's indices load while block j is accumulated, so a
            # program keeps two weight tiles in flight and no load waits on an index load.
            jj = tl.arange(0, BK)
            rows = tl.load(scratch + jj, mask=jj < n_active, other=0)
            rows_next = tl.load(scratch + BK + jj, mask=BK + jj < n_active, other=0)
            w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_w + cols[None, :],
                        mask=(jj < n_active)[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
            xv = tl.load(x_ptr + rows, mask=jj < n_active, other=0.0)
            for j in range(0, n_active, BK):
                jn = j + BK + jj
                jn_ok = jn < n_active
                w_next = tl.load(w_ptr + rows_next.to(tl.int64)[:, None] * stride_w + cols[None, :],
                                 mask=jn_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
                x_next = tl.load(x_ptr + rows_next, mask=jn_ok, other=0.0)
                rows_next = tl.load(scratch + jn + BK, mask=jn + BK < n_active, other=0)
                acc += w.to(tl.float32) * xv.to(tl.float32)[:, None]
                w = w_next
                xv = x_next
        elif BB == 1 or not DOT:
            # Every listed row is kept (by some token), so the weight loads wait on nothing but
            # the index list, and the next block's indices load while this block's weights stream.
            jj = tl.arange(0, BK)
            rows = tl.load(scratch + jj, mask=jj < n_active, other=0)
            for j in range(0, n_active, BK):
                jj = j + tl.arange(0, BK)
                j_ok = jj < n_active
                next_rows = tl.load(scratch + jj + BK, mask=jj + BK < n_active, other=0)
                w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_w + cols[None, :],
                            mask=j_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
                if BB == 1:
                    xv = tl.load(x_ptr + rows, mask=j_ok, other=0.0)
                    acc += w.to(tl.float32) * xv.to(tl.float32)[:, None]
                else:
                    acc = _accumulate_tokens(acc, w.to(tl.float32), rows, j_ok, x_ptr, scale_ptr, t, toks, B, stride_x,
                                             HAS_SCALE, BB)
                rows = next_rows
        else:
            for j in range(0, n_active, BK):
                jj = j + tl.arange(0, BK)
                j_ok = jj < n_active
                rows = tl.load(scratch + jj, mask=j_ok, other=0)
                acc = _accumulate(acc, rows, j_ok, x_ptr, scale_ptr, w_ptr, t, cols, col_ok, toks, tok_ok, B,
                                  stride_x, stride_w, HAS_SCALE, IEEE, BB, DOT)
    else:
        # Every row block in turn, the weight loads masked by the kept rows: more iterations at
        # high sparsity, but no index list, so the loads pipeline like a dense GEMV's.
        for k0 in range(k_lo, k_hi, BK):
            rows = k0 + tl.arange(0, BK)
            acc = _accumulate(acc, rows, rows < k_hi, x_ptr, scale_ptr, w_ptr, t, cols, col_ok, toks, tok_ok, B,
                              stride_x, stride_w, HAS_SCALE, IEEE, BB, DOT)
    if BB == 1:
        part = tl.sum(acc, axis=0)
    else:
        part = acc
    if HAS_LOWRANK:
        # B's rows are more input rows: each program of a column block adds its share of the ranks,
        # so the whole grid reads B, not only the N / BN programs that finish a column block.
        r_share = tl.cdiv(R, split_k)
        r_lo = pid_k * r_share
        part = _lowrank_term(part, r_lo, tl.minimum(r_lo + r_share, R), lrb_ptr, lrz_ptr, cols, col_ok, toks, tok_ok, B,
                             stride_lrb, stride_lrz, IEEE, BB, BR, DOT)

    if USE_SPLIT and SPREAD:
        # Split-K, spread: every program of the column block waits until all have stored their
        # partials (the launch is cooperative, so they are all resident and the wait ends), then
        # sums one slice of SL columns over the SS >= split_k partials. The arrivals count the
        # counter up to split_k and the finished sums on to 2 * split_k; the last resets it.
        tl.store(part_ptr + pid_k * N + cols, part, mask=col_ok)
        tl.debug_barrier()
        seen = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") + 1
        while seen < split_k:
            seen = tl.atomic_add(count_ptr + pid_n, 0, sem="acquire")
        in_block = pid_k * SL + tl.arange(0, SL)
        slice_cols = pid_n * BN + in_block
        slice_ok = (in_block < BN) & (slice_cols < N)
        ss = tl.arange(0, SS)
        p = tl.load(part_ptr + ss[:, None] * N + slice_cols[None, :], mask=(ss < split_k)[:, None] & slice_ok[None, :],
                    other=0.0, cache_modifier=".cg")
        _epilogue(tl.sum(p, axis=0), pid_n * BN + pid_k * SL, bias_ptr, y_ptr, slice_cols, slice_ok, toks, tok_ok,
                  stride_y, HAS_BIAS, BB, SL, ACT, GROUP)
        if tl.atomic_add(count_ptr + pid_n, 1, sem="relaxed") == 2 * split_k - 1:
            tl.atomic_xchg(count_ptr + pid_n, 0)
    elif USE_SPLIT:
        # Split-K: the last program of this column block to arrive sums the partials, SC at a time
        # (all loads of a chunk in flight together).
        if BB == 1:
            tl.store(part_ptr + pid_k * N + cols, part, mask=col_ok)
        else:
            tl.store(part_ptr + (pid_k * B + toks)[:, None] * N + cols[None, :], part, mask=tok_ok[:, None] & col_ok[None, :])
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == split_k - 1:
            total = tl.zeros_like(part)
            for s0 in range(0, split_k, SC):
                ss = s0 + tl.arange(0, SC)
                s_ok = ss < split_k
                if BB == 1:
                    p = tl.load(part_ptr + ss[:, None] * N + cols[None, :], mask=s_ok[:, None] & col_ok[None, :],
                                other=0.0, cache_modifier=".cg")
                else:
                    p = tl.load(
                        part_ptr + (ss[:, None, None] * B + toks[None, :, None]) * N + cols[None, None, :],
                        mask=s_ok[:, None, None] & tok_ok[None, :, None] & col_ok[None, None, :],
                        other=0.0, cache_modifier=".cg",
                    )
                total += tl.sum(p, axis=0)
            _epilogue(total, pid_n * BN, bias_ptr, y_ptr, cols, col_ok, toks, tok_ok, stride_y, HAS_BIAS, BB, BN, ACT, GROUP)
            tl.atomic_xchg(count_ptr + pid_n, 0)
    else:
        _epilogue(part, pid_n * BN, bias_ptr, y_ptr, cols, col_ok, toks, tok_ok, stride_y, HAS_BIAS, BB, BN, ACT, GROUP)


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """1: SiLU, 2: GELU (tanh approximation), 3: GELU (erf), 4: ReLU; in fp32."""
    if ACT == 1:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * (1.0 - 1.0 / (1.0 + tl.exp(2.0 * inner)))
    elif ACT == 3:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        return tl.maximum(g, 0.0)


@triton.jit
def _lowrank_term(total, r_lo, r_hi, lrb_ptr, lrz_ptr, cols, col_ok, toks, tok_ok, B, stride_lrb, stride_lrz,
                  IEEE: tl.constexpr, BB: tl.constexpr, BR: tl.constexpr, DOT: tl.constexpr):
    """total + ``lowrank_b[cols, r_lo:r_hi] @ z[:, r_lo:r_hi]`` in fp32 (total: [W] at batch 1, else [BB, W])."""
    for r0 in range(r_lo, r_hi, BR):
        rs = r0 + tl.arange(0, BR)
        r_ok = rs < r_hi
        lrb = tl.load(lrb_ptr + cols[:, None] * stride_lrb + rs[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        if BB == 1:
            z = tl.load(lrz_ptr + rs, mask=r_ok, other=0.0).to(tl.float32)
            total += tl.sum(lrb.to(tl.float32) * z[None, :], axis=1)
        elif DOT:
            z = tl.load(lrz_ptr + toks[:, None] * stride_lrz + rs[None, :], mask=tok_ok[:, None] & r_ok[None, :], other=0.0)
            if IEEE:
                total = tl.dot(z.to(lrb.dtype), tl.trans(lrb), total, input_precision="ieee")
            else:
                total = tl.dot(z.to(lrb.dtype), tl.trans(lrb), total)
        else:
            for b in tl.static_range(BB):
                z = tl.load(lrz_ptr + b * stride_lrz + rs, mask=r_ok & (tl.zeros_like(rs) + b < B), other=0.0)
                term = tl.sum(lrb.to(tl.float32) * z.to(tl.float32)[None, :], axis=1)
                total = tl.where(toks[:, None] == b, total + term[None, :], total)
    return total


@triton.jit
def _epilogue(total, first, bias_ptr, y_ptr, cols, col_ok, toks, tok_ok, stride_y,
              HAS_BIAS: tl.constexpr, BB: tl.constexpr, W: tl.constexpr, ACT: tl.constexpr, GROUP: tl.constexpr):
    """Adds the bias in fp32, then stores y for the W columns `cols` (the first is `first`); with
    ACT (batch 1), the columns are gate and up interleaved in groups of GROUP (W a multiple of
    2 * GROUP, `first` of 2 * GROUP) and the stored output is ``act(gate) * up``, rounded to y's
    dtype at each step as the torch MLP rounds."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if BB == 1:
            total += bias
        else:
            total += bias[None, :]
    if ACT != 0:
        pairs: tl.constexpr = W // (2 * GROUP)
        g, u = tl.split(tl.permute(tl.reshape(total, (pairs, 2, GROUP)), (0, 2, 1)))
        g_ok, _ = tl.split(tl.permute(tl.reshape(col_ok.to(tl.int32), (pairs, 2, GROUP)), (0, 2, 1)))
        dtype = y_ptr.dtype.element_ty
        g = tl.reshape(g, (W // 2,)).to(dtype).to(tl.float32)
        u = tl.reshape(u, (W // 2,)).to(dtype).to(tl.float32)
        a = _activation(g, ACT).to(dtype).to(tl.float32)
        out = first // 2 + tl.arange(0, W // 2)
        tl.store(y_ptr + out, (a * u).to(dtype), mask=tl.reshape(g_ok, (W // 2,)) > 0)
    elif BB == 1:
        tl.store(y_ptr + cols, total.to(y_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(y_ptr + toks[:, None] * stride_y + cols[None, :], total.to(y_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def output_sparse_rows_kernel(
    x_ptr, a_ptr, thr_ptr, w_ptr, m_ptr,
    B, J, D,
    stride_x, stride_a, stride_w, stride_m,
    IEEE: tl.constexpr, BB: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        wait_for_producer()
    pid = tl.program_id(0)
    js = pid * BJ + tl.arange(0, BJ)
    j_ok = js < J
    toks = tl.arange(0, BB)
    tok_ok = toks < B
    t = tl.load(thr_ptr)
    a = tl.load(a_ptr + toks[:, None] * stride_a + js[None, :], mask=tok_ok[:, None] & j_ok[None, :], other=0.0)
    keep = (tl.abs(a.to(tl.float32)) > t) & tok_ok[:, None] & j_ok[None, :]
    a_kept = tl.where(keep, a.to(tl.float32), 0.0)
    row_on = tl.max(keep.to(tl.int32), axis=0) > 0
    n_on = tl.sum(row_on.to(tl.int32), axis=0)
    if BB == 1:
        acc = tl.zeros([BJ, BD], dtype=tl.float32)
    else:
        acc = tl.zeros([BB, BJ], dtype=tl.float32)
    if n_on > 0:
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            d_ok = ds < D
            w = tl.load(
                w_ptr + js.to(tl.int64)[:, None] * stride_w + ds[None, :],
                mask=row_on[:, None] & d_ok[None, :], other=0.0, eviction_policy="evict_first",
            )
            if BB == 1:
                xv = tl.load(x_ptr + ds, mask=d_ok, other=0.0)
                acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            else:
                xv = tl.load(x_ptr + toks[:, None] * stride_x + ds[None, :], mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(xv.to(w.dtype), tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xv.to(w.dtype), tl.trans(w), acc)
    if BB == 1:
        u = tl.sum(acc, axis=1)[None, :]
    else:
        u = acc
    # Round u and the product as the reference does: u = up(x) in the model dtype, then a * u.
    u = u.to(m_ptr.dtype.element_ty).to(tl.float32)
    m = (a_kept * u).to(m_ptr.dtype.element_ty)
    tl.store(m_ptr + toks[:, None] * stride_m + js[None, :], m, mask=tok_ok[:, None] & j_ok[None, :])


@triton.jit
def _score_bits(x_ptr, scale_ptr, idx, ok, HAS_SCALE: tl.constexpr):
    """x and its score |x| (* scale) as int32 bits: for non-negative floats the bit patterns order
    as the values do."""
    xv = tl.load(x_ptr + idx, mask=ok, other=0.0)
    score = tl.abs(xv.to(tl.float32))
    if HAS_SCALE:
        score = score * tl.load(scale_ptr + idx, mask=ok, other=0.0)
    return xv, score.to(tl.int32, bitcast=True)


@triton.jit
def topk_keep_kernel(x_ptr, scale_ptr, out_ptr, D, K, stride_x, stride_o,
                     HAS_SCALE: tl.constexpr, LOW: tl.constexpr, PASSES: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    """out[row] = x[row] where the score is one of the row's K largest, else 0; of equal scores
    the lower index is kept first (`actsparse.nn.topk_mask`).

    One program per row: a radix select over the scores' bits, 5 at a time from the top (a
    32-bin histogram of the next digit among the scores that share the digits found so far),
    finds the K-th largest score and how many of the scores equal to it are kept; then one pass
    writes the output. Bits below LOW are zero in every score (a bf16 or fp16 |x| unscaled), so
    PASSES digits cover the rest. 32 bins because `tl.histogram` is lowered to about log2(bins) +
    bins / 32 * (log2(bins) + 1) instructions per score: 11 against 80 for 256 bins, and ~3x
    faster selections on the H200 (KERNELS_NOTES.md, session 15)."""
    if PDL:
        wait_for_producer()
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    o_row = out_ptr + row.to(tl.int64) * stride_o
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, 32)
    prefix = 0  # the digits of the K-th largest score found so far
    room = K  # how many of the scores sharing `prefix` are still to keep
    tied = K  # in the end: how many scores equal the K-th largest
    for p in tl.static_range(PASSES):
        shift = LOW + 5 * (PASSES - 1 - p)
        hist = tl.zeros([32], dtype=tl.int32)
        for start in range(0, D, BLOCK):
            idx = start + lanes
            ok = idx < D
            _, bits = _score_bits(x_row, scale_ptr, idx, ok, HAS_SCALE)
            if p > 0:
                ok = ok & ((bits >> (shift + 5)) == prefix)
            hist += tl.histogram((bits >> shift) & 31, 32, mask=ok)
        at_or_above = tl.sum(hist, 0) - (tl.cumsum(hist, 0) - hist)
        digit = tl.max(tl.where(at_or_above >= room, bins, 0), 0)
        room -= tl.sum(tl.where(bins > digit, hist, 0), 0)
        tied = tl.sum(tl.where(bins == digit, hist, 0), 0)
        prefix = (prefix << 5) | digit
    kth = prefix << LOW
    seen = K * 0  # scores equal to the K-th largest before this chunk
    for start in range(0, D, BLOCK):
        idx = start + lanes
        ok = idx < D
        xv, bits = _score_bits(x_row, scale_ptr, idx, ok, HAS_SCALE)
        if tied == room:
            keep = bits >= kth
        else:
            equal = bits == kth
            keep = (bits > kth) | (equal & (seen + tl.cumsum(equal.to(tl.int32), 0) <= room))
            seen += tl.sum(equal.to(tl.int32), 0)
        tl.store(o_row + idx, tl.where(keep, xv, tl.zeros_like(xv)), mask=ok)
