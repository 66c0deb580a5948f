"""Paged decode attention: one new query token per sequence over its paged K/V context.

Shapes: ``q [B, Hq, D]``, ``kv_layer [2, num_blocks, block_size, Hkv, D]``, ``block_tables int32
[B, max_blocks]``, ``seq_lens int32 [B]`` (context length including the new token, whose K/V are
already in the cache). Output ``[B, Hq, D]`` in ``q``'s dtype.

Design (memory-bound: every K/V byte of the batch is read once):

* GQA: one program owns a KV head and all ``G = Hq // Hkv`` query heads that share it, so K/V
  are read once per group. The G query rows are padded to 16 so the scores are a ``tl.dot``.
* Split-KV (flash-decoding): each (sequence, KV head) context is cut into ``num_splits`` equal
  chunks worked on by separate programs, so a small batch still fills every SM. Each split writes
  its partial output and log-sum-exp; a second kernel merges them. Chunk length is computed on
  the device from ``seq_lens``, so the grid depends only on host ints (CUDA-graph friendly).
* Online softmax with fp32 accumulators; probabilities are cast to the K/V dtype for the
  second product (standard flash-attention practice).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels._common import (
    FLOAT_DTYPES,
    check_device,
    check_head_dim,
    check_tensor,
    dot_upcast,
    next_pow2,
    sm_count,
)

_LOG2E = 1.4426950408889634
_MIN_CHUNK = 64  # tokens per split, at least one tile
_MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,  # [B, Hq, D] when NUM_SPLITS == 1, else partials [B, Hq, NUM_SPLITS, D] fp32
    lse_ptr,  # [B, Hq, NUM_SPLITS] fp32 (unused when NUM_SPLITS == 1)
    scale_log2,
    stride_qb,
    stride_qh,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_os,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)

    cache_head = cache_ptr + kv_head * stride_c_head
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    for t0 in range(start, end, BLOCK_N):
        toks = t0 + tl.arange(0, BLOCK_N)
        t_mask = toks < end
        block_ids = tl.load(table + toks // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        rows = block_ids * stride_c_block + (toks % BLOCK_SIZE) * stride_c_slot
        k_ptrs = cache_head + rows[:, None] + d[None, :]
        k = tl.load(k_ptrs, mask=t_mask[:, None], other=0.0)
        v = tl.load(k_ptrs + stride_c_kv, mask=t_mask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(t_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # An empty split (short sequence, or seq_len == 0 padding) leaves l_i == 0: write 0 / -inf.
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / safe_l[:, None]
    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.math.log2(safe_l), float("-inf"))  # log2 domain
        num_heads = tl.num_programs(1) * GROUP
        tl.store(lse_ptr + (b * num_heads + heads) * NUM_SPLITS + split, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_ptr,  # [B, Hq, NUM_SPLITS, D] fp32
    lse_ptr,  # [B, Hq, NUM_SPLITS] fp32, log2 domain
    out_ptr,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    s_mask = s < NUM_SPLITS
    row = b * NUM_HEADS + h
    lse = tl.load(lse_ptr + row * NUM_SPLITS + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    total = tl.sum(w, 0)
    w = w / tl.where(total > 0, total, 1.0)
    part = tl.load(
        part_ptr + (row * NUM_SPLITS + s[:, None]) * HEAD_DIM + d[None, :], mask=s_mask[:, None], other=0.0
    )
    out = tl.sum(part * w[:, None], 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per (sequence, KV head) so that the grid fills the SMs in ONE wave.

    Host ints only. Up to ``4 * num_sms`` programs: a 16-bit D=128 program uses ~39 KB of shared
    memory, so ~5 fit on an H100 SM; one more split than fits costs a second, mostly idle wave
    (measured: batch 32, context 4k: 82.6% of copy bandwidth with 3 splits, 94.2% with 2).
    Chunks may be as short as one 64-token tile: small batches are latency-bound, and more
    splits shorten each program's serial loop (measured: batch 1, context 512: 11.9 us with
    2 splits, 7.0 us with 8).
    """
    base = max(batch * num_kv_heads, 1)
    wanted = max((4 * num_sms) // base, 1)
    by_length = max(math.ceil(max_seq_len / _MIN_CHUNK), 1)
    return max(1, min(wanted, by_length, _MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context; returns ``[B, Hq, D]``.

    ``max_seq_len`` (a host int, >= every ``seq_lens``) only sizes the split count. ``num_splits``,
    ``block_n``, ``num_warps``, ``num_stages`` override the tuned defaults (benchmarks use them).
    """
    device = check_device(q)
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("kv_layer", kv_layer, ndim=5, dtypes=(q.dtype,), device=device)
    if kv_layer.shape[0] != 2:
        raise ValueError(f"kv_layer must be [2, num_blocks, block_size, Hkv, D], got {tuple(kv_layer.shape)}")
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, kv_dim = kv_layer.shape
    if kv_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != kv_layer head_dim {kv_dim}")
    check_head_dim(head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=device)
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(
            f"batch mismatch: q has {batch} rows, block_tables {block_tables.shape[0]}, seq_lens {seq_lens.shape[0]}"
        )
    if max_seq_len > block_tables.shape[1] * block_size:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds block_tables capacity {block_tables.shape[1]} x {block_size}"
        )
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != device or out.stride(-1) != 1:
        raise ValueError("out must match q's shape, dtype and device and be contiguous in its last dim")
    if batch == 0:
        return out

    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_seq_len, sm_count(device))
    if block_n is None:
        block_n = 32 if q.dtype == torch.float32 else 64
    upcast = dot_upcast()
    common = dict(
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        UPCAST=upcast,
        IEEE_DOT=upcast or q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    grid = (batch, num_kv_heads, num_splits)
    cache_strides = (kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3))
    scale_log2 = scale * _LOG2E
    if num_splits == 1:
        _decode_split_kernel[grid](
            q, kv_layer, block_tables, seq_lens, out, out, scale_log2,
            q.stride(0), q.stride(1), *cache_strides, block_tables.stride(0),
            out.stride(0), out.stride(1), 0,
            **common,
        )  # fmt: skip
        return out
    partial = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=device)
    _decode_split_kernel[grid](
        q, kv_layer, block_tables, seq_lens, partial, lse, scale_log2,
        q.stride(0), q.stride(1), *cache_strides, block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        **common,
    )  # fmt: skip
    _decode_reduce_kernel[(batch, num_heads)](
        partial, lse, out, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits, SPLITS_PAD=next_pow2(num_splits),
        num_warps=4,
    )  # fmt: skip
    return out


def decode_attention_ref(
    q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain-torch reference (fp32 math): gather each sequence's K/V densely, mask the padding."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    group = num_heads // num_kv_heads
    max_len = block_tables.shape[1] * block_size
    blocks = block_tables.long()  # [B, max_blocks]
    k = kv_layer[0][blocks].reshape(batch, max_len, num_kv_heads, head_dim).float()
    v = kv_layer[1][blocks].reshape(batch, max_len, num_kv_heads, head_dim).float()
    k = k.repeat_interleave(group, dim=2)  # [B, L, Hq, D]
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), k) * scale
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens.long()[:, None]  # [B, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # seq_len == 0 -> zeros
    return torch.einsum("bhl,blhd->bhd", probs, v).to(q.dtype)
