"""The `actsparse::` ops, each defined once: schema, fake implementation and torch reference.

The reference is each op's default implementation (any device); a device's kernel replaces it by
registering for that device's dispatch key (`triton_ops.register` for "cuda"; for "cpu" the C++
kernels of `cpu_torch_ops.cpp`, registered from C++ by `cpu_ops.register`), so the tensors' device picks the kernel and `torch.compile` traces every op through
its fake implementation.

  input_sparse_linear(x[T,K], weight_t[K,N], threshold, scale?, bias?, lowrank_b?, lowrank_z?,
                      sparsity) -> y[T,N]
      row k of `weight_t` is used for token b when score = |x[b,k]| (* scale[k]) > threshold;
      rows no token keeps are never read. `lowrank_z[T,R]` and `lowrank_b[N,R]` add
      ``z @ lowrank_b.T``.
  input_sparse_gated(x[1,K], weight_t[K,2J], threshold, scale?, bias?, lowrank_b?, lowrank_z?, group, act,
                     sparsity) -> m[1,J]
      the same product over a gate+up weight whose columns alternate gate and up in groups of
      `group` (`actsparse.nn.packing.interleave_gate_up`; `lowrank_b`'s rows alike), returning
      act(gate) * up.
  output_sparse_rows(x[T,D], a[T,J], threshold, weight[J,D], sparsity) -> m[T,J]
      m = where(|a| > threshold, a, 0) * (x @ weight.T); rows of `weight` whose `a` is masked
      for every token are never read.
  dense_linear(x[T,K], weight[N,K], bias?) -> y[T,N]
      ``F.linear`` over nn.Linear's own (output-major) weight: the dense linears and the LM head
      of a decode step on devices whose kernels beat the library's own matvec (the CPU).
  topk_kept(x[T,D], k, scale?) -> kept[T,D]
      x where its score |x| (* scale) is one of the k largest of its row, else 0; of equal
      scores the lower index first (`topk_mask`). Scores must not be negative.
  decode_attention(query[B,Hq,Q,D], key[B,Hkv,L,D], value[B,Hkv,L,D], mask?, scale, softcap)
                   -> out[B,Q,Hq,D]
      softmax(cap(scale * q k^T) + mask) v per query head, query head h reading KV head
      h // (Hq / Hkv) (grouped-query attention); `mask` broadcasts to [B,Hq,Q,L] and is boolean
      (True: attend) or additive; `softcap` > 0 applies softcap * tanh(s / softcap) first
      (Gemma 2). A query with no key to attend gives zeros. Kernels take decode steps: at most
      ATTENTION_MAX_ROWS query rows per KV head ((Hq / Hkv) * Q) and head size ATTENTION_MAX_HEAD_DIM.

Each op's default implementation is its reference (`*_reference`, also callable directly), except
`input_sparse_gated`, whose default calls the `input_sparse_linear` op and applies the activation.
`sparsity` is the fraction the caller expects to skip: kernels pick their tuned launch config by
its bin (`tuning.sparsity_bin`); the result does not depend on it. Kernels take decode batches
of at most MAX_BATCH tokens; callers run longer inputs (prefill) through the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MAX_BATCH = 8
ATTENTION_MAX_ROWS = 64
ATTENTION_MAX_HEAD_DIM = 256

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest scores of each row. Of equal scores the lower index is kept first, so the
    kept set is the same on every device and kernel (`torch.topk` leaves ties unspecified)."""
    kth = score.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = score > kth
    tied = score == kth
    room = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def _score(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    score = x.abs().float()
    return score * scale if scale is not None else score


def _zero_where_not(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def input_sparse_linear_reference(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lowrank_b: Optional[torch.Tensor],
    lowrank_z: Optional[torch.Tensor],
    sparsity: float,
) -> torch.Tensor:
    kept = _zero_where_not(_score(x, scale) > threshold, x)
    y = F.linear(kept, weight_t.T, bias)
    if lowrank_b is not None:
        y = y + F.linear(lowrank_z, lowrank_b)
    return y


input_sparse_linear = torch.library.custom_op("actsparse::input_sparse_linear", input_sparse_linear_reference, mutates_args=())


@input_sparse_linear.register_fake
def _(x, weight_t, threshold, scale, bias, lowrank_b, lowrank_z, sparsity):
    return x.new_empty((x.shape[0], weight_t.shape[1]))


@torch.library.custom_op("actsparse::input_sparse_gated", mutates_args=())
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
    """By default the `input_sparse_linear` op (the device's kernel) and the activation in torch."""
    if act not in ACTIVATIONS:
        raise ValueError(f"input_sparse_gated: act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    gu = input_sparse_linear(x, weight_t, threshold, scale, bias, lowrank_b, lowrank_z, sparsity)
    j = gu.shape[-1] // 2
    pairs = gu.reshape(gu.shape[0], j // group, 2, group)
    gate, up = pairs[:, :, 0].reshape(-1, j), pairs[:, :, 1].reshape(-1, j)
    return ACTIVATIONS[act](gate) * up


@input_sparse_gated.register_fake
def _(x, weight_t, threshold, scale, bias, lowrank_b, lowrank_z, group, act, sparsity):
    return x.new_empty((x.shape[0], weight_t.shape[1] // 2))


def output_sparse_rows_reference(x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor,
                       sparsity: float) -> torch.Tensor:
    return _zero_where_not(a.abs() > threshold, a) * F.linear(x, weight)


output_sparse_rows = torch.library.custom_op("actsparse::output_sparse_rows", output_sparse_rows_reference, mutates_args=())


@output_sparse_rows.register_fake
def _(x, a, threshold, weight, sparsity):
    return x.new_empty((x.shape[0], weight.shape[0]))


def dense_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


dense_linear = torch.library.custom_op("actsparse::dense_linear", dense_linear_reference, mutates_args=())


@dense_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def topk_kept_reference(x: torch.Tensor, k: int, scale: Optional[torch.Tensor]) -> torch.Tensor:
    return _zero_where_not(topk_mask(_score(x, scale), k), x)


topk_kept = torch.library.custom_op("actsparse::topk_kept", topk_kept_reference, mutates_args=())


@topk_kept.register_fake
def _(x, k, scale):
    return torch.empty_like(x)


def check_decode_attention(query, key, value, mask) -> None:
    """Raise ValueError naming what `decode_attention` cannot take."""
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(f"decode_attention: query [B,Hq,Q,D] and key = value [B,Hkv,L,D], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    batch, heads, q_len, head_dim = query.shape
    if key.shape[0] != batch or key.shape[3] != head_dim or heads % key.shape[1]:
        raise ValueError(f"decode_attention: key {tuple(key.shape)} does not fit query {tuple(query.shape)} "
                         "(same batch and head size, query heads a multiple of KV heads)")
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


def decode_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor], scale: float, softcap: float
) -> torch.Tensor:
    check_decode_attention(query, key, value, mask)
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, 1)
    v = value.float().repeat_interleave(groups, 1)
    s = query.float() @ k.transpose(-1, -2) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    p = torch.nan_to_num(torch.softmax(s, -1))  # a row with nothing to attend: zeros
    return (p @ v).transpose(1, 2).to(query.dtype).contiguous()


decode_attention = torch.library.custom_op("actsparse::decode_attention", decode_attention_reference, mutates_args=())


@decode_attention.register_fake
def _(query, key, value, mask, scale, softcap):
    batch, heads, q_len, head_dim = query.shape
    return query.new_empty((batch, q_len, heads, head_dim))


OPS = (input_sparse_linear, input_sparse_gated, output_sparse_rows, dense_linear, topk_kept, decode_attention)
