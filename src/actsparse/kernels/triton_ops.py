"""The Triton implementations of the `actsparse::` ops of `ops.py`, registered for CUDA tensors.

`register()` (run on import) makes them the "cuda" kernels of those ops; `register("cpu")` makes
them the CPU kernels too, for testing them under ``TRITON_INTERPRET=1`` (with the C++ kernels set
aside by `cpu_ops.unregister()`; `cpu_ops.register()` puts them back). Each function here checks its inputs, picks a launch configuration
tuned per shape, batch, dtype and sparsity bin (`tuning.py`) and launches; the semantics are the
ops' (`ops.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton

from . import ops, tuning
from .ops import MAX_BATCH
from .triton_kernels import input_sparse_gemv_kernel, output_sparse_rows_kernel, topk_keep_kernel

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MAX_COLUMN_BLOCKS = 1 << 16
_DEPENDENT_LAUNCH = {"enabled": True}


def set_dependent_launch(enabled: bool) -> None:
    """Whether kernels launch with programmatic dependent launch where the GPU has it (on by
    default; off only to measure what it brings)."""
    _DEPENDENT_LAUNCH["enabled"] = bool(enabled)


def dependent_launch(device: torch.device) -> bool:
    """Programmatic dependent launch: on for CUDA devices of compute capability 9.0 (Hopper) and
    later, never under the Triton interpreter."""
    return (_DEPENDENT_LAUNCH["enabled"] and device.type == "cuda" and not tuning.interpreting()
            and torch.cuda.get_device_capability(device)[0] >= 9)


@dataclass(frozen=True)
class GemvConfig:
    bn: int
    bk: int
    split_k: int
    num_warps: int
    num_stages: int
    compact: bool = True
    pipelined: bool = False  # batch-1 compact loop with two weight tiles in flight
    spread: bool = False  # batch-1 split-K sums spread over the column block's programs (cooperative launch)
    dot: bool = False  # batches: tensor-core tiles (tl.dot, the batch padded to 16), else CUDA-core FMAs per token


@dataclass(frozen=True)
class TopkConfig:
    block: int  # scores per step of the program's loops over its row
    num_warps: int


@dataclass(frozen=True)
class RowsConfig:
    bj: int
    bd: int
    num_warps: int
    num_stages: int


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_b(batch: int, dot: bool) -> int:
    # One token: an elementwise fp32 accumulator. More: tl.dot, whose M must be at least 16, or
    # one accumulator row per token.
    if batch == 1:
        return 1
    return 16 if dot else triton.next_power_of_2(batch)


# CUDA-core batch tiles: a column block of 256 columns per warp (one 16-byte load per thread and
# row) keeps each token's row sums within the threads; the tile's rows shrink as the batch grows,
# to hold the per-token accumulators in registers without spills (KERNELS_NOTES.md, session 14).
_BATCH_ROWS = {2: (8, 16), 4: (4, 8), 8: (2, 4)}


def gemv_candidates(n: int, k: int, batch: int, device: torch.device) -> list[GemvConfig]:
    if tuning.interpreting() or device.type != "cuda":
        return [GemvConfig(32, 16, 2, 4, 1)]
    # Batch 1: 4 warps won every problem of benchmarks/gemv_configs.py on the H200, 512-column
    # blocks (1 KB row segments) most of them
    # (benchmarks/results/gemv/gemv_configs_h200_2026-11-23_run{1,2,3}.json).
    if batch == 1:
        tiles = [(512, 16, 4, 3, False), (512, 32, 4, 3, False), (1024, 8, 4, 3, False), (1024, 16, 4, 3, False),
                 (128, 64, 4, 3, False), (256, 32, 4, 3, False)]
    else:
        rows = _BATCH_ROWS[triton.next_power_of_2(batch)]
        tiles = [(bn, bk, warps, 1, False) for bk in rows for bn, warps in ((512, 2), (1024, 4))]
        tiles += [(64, 32, 4, 3, True), (128, 32, 4, 3, True), (128, 64, 8, 3, True)]
    sms = _sm_count(device)
    out: list[GemvConfig] = []
    # The pipelined loop holds two weight tiles in registers: tiles of at most 8192 elements.
    variants = [(True, False), (False, False)] + ([(True, True)] if batch == 1 else [])
    for compact, pipelined in variants:
        for bn, bk, warps, stages, dot in tiles:
            if pipelined and bn * bk > 8192:
                continue
            blocks = triton.cdiv(n, bn)
            max_split = max(1, min(64, k // (2 * bk)))
            for waves in (1, 2, 4, 8):
                split = max(1, min(max_split, round(waves * sms / blocks)))
                # A spread reduction needs the whole grid resident at once: at most two waves.
                spreads = (False, True) if batch == 1 and compact and split > 1 and waves <= 2 else (False,)
                for spread in spreads:
                    cfg = GemvConfig(bn, bk, split, warps, stages, compact, pipelined, spread, dot)
                    if cfg not in out:
                        out.append(cfg)
    return out


def rows_candidates(batch: int, device: torch.device) -> list[RowsConfig]:
    if tuning.interpreting() or device.type != "cuda":
        return [RowsConfig(4 if batch == 1 else 16, 32, 4, 1)]
    if batch == 1:
        return [RowsConfig(4, 512, 4, 3), RowsConfig(8, 256, 4, 3), RowsConfig(2, 1024, 4, 3), RowsConfig(16, 256, 8, 3)]
    return [RowsConfig(16, 128, 4, 3), RowsConfig(16, 256, 8, 3), RowsConfig(32, 128, 8, 3)]


def topk_candidates(d: int, device: torch.device) -> list[TopkConfig]:
    if tuning.interpreting() or device.type != "cuda":
        return [TopkConfig(min(128, triton.next_power_of_2(d)), 4)]
    # At most 16 scores per thread: 32 use ~170 registers and spill a little (sm_90 compile).
    # The most warps win on the H200; 32 (4 scores a thread) did not (run 33).
    blocks = sorted({min(b, triton.next_power_of_2(d)) for b in (1024, 2048, 4096, 8192)})
    return [TopkConfig(b, w) for b in blocks for w in (4, 8, 16) if 32 * w <= b <= 16 * 32 * w]


ACTIVATIONS = {"silu": 1, "gelu_tanh": 2, "gelu": 3, "relu": 4}  # the kernels' codes of `ops.ACTIVATIONS`


def gated_candidates(n: int, k: int, device: torch.device, group: int) -> list[GemvConfig]:
    fitting = [c for c in gemv_candidates(n, k, 1, device)
               if c.bn % (2 * group) == 0 and not (c.spread and _spread_slice(c) < 2 * group)]
    return fitting or [replace(gemv_candidates(n, k, 1, device)[0], bn=2 * group)]


def _spread_slice(cfg: GemvConfig) -> int:
    """The fewest columns each program of a spread reduction sums (more when the rows round to
    fewer splits)."""
    return triton.next_power_of_2(triton.cdiv(cfg.bn, cfg.split_k))


def _counters(device: torch.device) -> torch.Tensor:
    # Arrival counters of the split-K reduction: zero between launches (the last program of each
    # column block resets its own), so one buffer serves every launch on the device's stream.
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(_MAX_COLUMN_BLOCKS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def launch_input_sparse(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    lowrank_b: torch.Tensor | None,
    lowrank_z: torch.Tensor | None,
    cfg: GemvConfig,
    y: torch.Tensor,
    act: str | None = None,
    group: int = 1,
) -> None:
    batch, k = x.shape
    n = weight_t.shape[1]
    bb = _block_b(batch, cfg.dot)
    pdl = dependent_launch(x.device)
    blocks = triton.cdiv(n, cfg.bn)
    if blocks > _MAX_COLUMN_BLOCKS:
        raise ValueError(f"{n} output columns need {blocks} column blocks; at most {_MAX_COLUMN_BLOCKS}")
    rows_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), 16) * 16
    split_k = triton.cdiv(k, rows_per_split)
    spread = cfg.spread and split_k > 1
    spread_slice = _spread_slice(replace(cfg, split_k=split_k)) if spread else 1
    if cfg.spread and bb != 1:
        raise ValueError(f"{cfg}: a spread split-K reduction is for one token, got {batch} tokens")
    if spread and act and spread_slice < 2 * group:
        raise ValueError(f"{cfg}: its spread slices of {spread_slice} columns split the gate/up groups of {group}")
    idx = torch.empty(blocks * split_k * rows_per_split if cfg.compact else 1, dtype=torch.int32, device=x.device)
    part = torch.empty((split_k, batch, n) if split_k > 1 else (1,), dtype=torch.float32, device=x.device)
    rank = lowrank_b.shape[1] if lowrank_b is not None else 0
    # One compaction chunk per program where it fits (each chunk is an x load round trip), and
    # the split-K partials summed in as few chunks as registers allow (each a round trip too).
    chunk = min(2048 if bb == 1 else 128, triton.next_power_of_2(rows_per_split))
    # The low-rank term's tile of B is BN x BR weights in registers: at most 8192. A 1024 x 64 tile
    # is 512 fp32 values a thread at 4 warps; with BR up to 64, R-Sparse's first low-rank problem
    # was still compiling its candidates after 250 s on an H100 (> 3.5 s a config).
    lowrank_rows = 16 if bb > 1 else max(1, min(64, triton.next_power_of_2(max(rank, 1)), 8192 // cfg.bn))
    split_chunk = max(1, min(64, 8192 // (bb * cfg.bn)))
    args = (
        x, scale if scale is not None else threshold, threshold, weight_t,
        bias if bias is not None else weight_t, lowrank_b if lowrank_b is not None else weight_t,
        lowrank_z if lowrank_z is not None else x, y,
        idx, part, _counters(x.device),
        batch, k, n, rank, rows_per_split, split_k,
        x.stride(0), weight_t.stride(0), y.stride(0),
        lowrank_b.stride(0) if lowrank_b is not None else 0,
        lowrank_z.stride(0) if lowrank_z is not None else 0,
    )
    kwargs = dict(
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HAS_LOWRANK=lowrank_b is not None,
        USE_SPLIT=split_k > 1, IEEE=weight_t.dtype == torch.float32, COMPACT=cfg.compact, PIPE=cfg.pipelined and cfg.compact and bb == 1,
        BB=bb, BN=cfg.bn, BK=cfg.bk, CHUNK=chunk, BR=lowrank_rows,
        SC=split_chunk, ACT=ACTIVATIONS[act] if act else 0, GROUP=group, PDL=pdl,
        SPREAD=spread, SS=triton.next_power_of_2(split_k) if spread else 1, SL=spread_slice, DOT=cfg.dot and bb > 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl, launch_cooperative_grid=spread,
    )
    if spread:
        variant = (x.device, x.dtype, weight_t.dtype, y.dtype, tuple(sorted(kwargs.items())))
        if variant not in _RESIDENT_PER_SM:
            compiled = input_sparse_gemv_kernel.warmup(*args, grid=(blocks, split_k), **kwargs)
            _RESIDENT_PER_SM[variant] = _resident_per_sm(compiled, x.device)
        _check_resident(_RESIDENT_PER_SM[variant], blocks * split_k, x.device)
    input_sparse_gemv_kernel[(blocks, split_k)](*args, **kwargs)


_RESIDENT_PER_SM: dict[tuple, int] = {}  # by kernel variant: compiling one to read its registers is not free


def _resident_per_sm(compiled, device: torch.device) -> int:
    """How many programs of `compiled` one SM holds at once (registers, shared memory, threads)."""
    compiled._init_handles()  # loads the binary, which fills in n_regs
    props = torch.cuda.get_device_properties(device)
    threads = compiled.metadata.num_warps * 32
    per_sm = min(32, props.max_threads_per_multi_processor // threads,
                 props.regs_per_multiprocessor // (triton.cdiv(compiled.n_regs, 8) * 8 * threads))
    if compiled.metadata.shared:
        per_sm = min(per_sm, props.shared_memory_per_multiprocessor // (compiled.metadata.shared + 1024))
    return per_sm


def _check_resident(per_sm: int, programs: int, device: torch.device) -> None:
    """A spread reduction spins until every program of its column block has arrived: the grid must
    fit on the device at once, or it is refused."""
    props = torch.cuda.get_device_properties(device)
    if programs > per_sm * props.multi_processor_count:
        raise tuning.Unlaunchable(f"a spread reduction over {programs} programs; {props.name} holds "
                                  f"{per_sm} x {props.multi_processor_count} of them at once")


def launch_output_sparse_rows(
    x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor, cfg: RowsConfig, m: torch.Tensor
) -> None:
    batch, d = x.shape
    j = weight.shape[0]
    pdl = dependent_launch(x.device)
    output_sparse_rows_kernel[(triton.cdiv(j, cfg.bj),)](
        x, a, threshold, weight, m,
        batch, j, d,
        x.stride(0), a.stride(0), weight.stride(0), m.stride(0),
        IEEE=weight.dtype == torch.float32, BB=_block_b(batch, dot=True), BJ=cfg.bj, BD=cfg.bd, PDL=pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
    )


# Low bits that are zero in every unscaled score |x| as float32: the mantissa bits bf16 and fp16 lack.
_ZERO_SCORE_BITS = {torch.bfloat16: 16, torch.float16: 13}


def launch_topk_kept(x: torch.Tensor, k: int, scale: torch.Tensor | None, cfg: TopkConfig, out: torch.Tensor) -> None:
    pdl = dependent_launch(x.device)
    low = 0 if scale is not None else _ZERO_SCORE_BITS.get(x.dtype, 0)
    topk_keep_kernel[(x.shape[0],)](
        x, scale if scale is not None else x, out, x.shape[1], k, x.stride(0), out.stride(0),
        HAS_SCALE=scale is not None, LOW=low, PASSES=triton.cdiv(31 - low, 5), BLOCK=cfg.block, PDL=pdl,
        num_warps=cfg.num_warps, launch_pdl=pdl,
    )


def _check_decode_batch(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH:
        raise ValueError(f"{what}: x must be [tokens <= {MAX_BATCH}, features], got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{what}: x must have unit stride in its last dimension")


def input_sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lowrank_b: Optional[torch.Tensor],
    lowrank_z: Optional[torch.Tensor],
    sparsity: float,
) -> torch.Tensor:
    _check_decode_batch(x, "input_sparse_linear")
    batch, k = x.shape
    n = weight_t.shape[1]
    y = torch.empty((batch, n), dtype=x.dtype, device=x.device)
    args = (x, weight_t, threshold, scale, bias, lowrank_b, lowrank_z)
    key = (
        "gemv", n, k, batch, x.dtype, scale is not None, bias is not None, lowrank_b is not None,
        tuning.sparsity_bin(sparsity),
    )
    cfg = tuning.choose(key, gemv_candidates(n, k, batch, x.device), lambda c: launch_input_sparse(*args, c, y), x.device)
    launch_input_sparse(*args, cfg, y)
    return y



def topk_kept(x: torch.Tensor, k: int, scale: Optional[torch.Tensor]) -> torch.Tensor:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"topk_kept: x must be [tokens, features] with unit stride in the last dimension, got {tuple(x.shape)}")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"topk_kept: k must be in 1..{x.shape[1]}, got {k}")
    if scale is not None and (scale.shape != (x.shape[1],) or scale.dtype != torch.float32):
        raise ValueError(f"topk_kept: scale must be float32 of shape ({x.shape[1]},), got {scale.dtype} {tuple(scale.shape)}")
    out = torch.empty_like(x)
    key = ("topk", x.shape[1], x.shape[0], x.dtype, scale is not None)
    cfg = tuning.choose(key, topk_candidates(x.shape[1], x.device), lambda c: launch_topk_kept(x, k, scale, c, out), x.device)
    launch_topk_kept(x, k, scale, cfg, out)
    return out



def input_sparse_gated(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lowrank_b: Optional[torch.Tensor],
    lowrank_z: Optional[torch.Tensor],
    group: int,
    act: str,
    sparsity: float,
) -> torch.Tensor:
    _check_decode_batch(x, "input_sparse_gated")
    if x.shape[0] != 1:
        raise ValueError(f"input_sparse_gated: one token at a time, got {x.shape[0]}")
    if act not in ACTIVATIONS:
        raise ValueError(f"input_sparse_gated: act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    k, n = weight_t.shape
    if n % (2 * group) or group & (group - 1):
        raise ValueError(f"input_sparse_gated: group {group} must be a power of two and {n} a multiple of twice it")
    m = torch.empty((1, n // 2), dtype=x.dtype, device=x.device)
    args = (x, weight_t, threshold, scale, bias, lowrank_b, lowrank_z)
    key = ("gated", n, k, x.dtype, scale is not None, bias is not None, group, act, tuning.sparsity_bin(sparsity))
    if lowrank_b is not None:  # (the keys of earlier tuning caches, without a low-rank term, stay valid)
        key += ("lowrank",)
    cfg = tuning.choose(
        key, gated_candidates(n, k, x.device, group), lambda c: launch_input_sparse(*args, c, m, act, group), x.device
    )
    launch_input_sparse(*args, cfg, m, act, group)
    return m



def output_sparse_rows(x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    _check_decode_batch(x, "output_sparse_rows")
    batch, d = x.shape
    j = weight.shape[0]
    m = torch.empty((batch, j), dtype=x.dtype, device=x.device)
    key = ("rows", j, d, batch, x.dtype, tuning.sparsity_bin(sparsity))
    cfg = tuning.choose(
        key, rows_candidates(batch, x.device), lambda c: launch_output_sparse_rows(x, a, threshold, weight, c, m), x.device
    )
    launch_output_sparse_rows(x, a, threshold, weight, cfg, m)
    return m


def register(device_type: str = "cuda") -> None:
    """Make these the `device_type` kernels of the `actsparse::` ops."""
    ops.input_sparse_linear.register_kernel(device_type, input_sparse_linear)
    ops.input_sparse_gated.register_kernel(device_type, input_sparse_gated)
    ops.output_sparse_rows.register_kernel(device_type, output_sparse_rows)
    ops.topk_kept.register_kernel(device_type, topk_kept)


register()
