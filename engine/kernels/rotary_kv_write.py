"""Rotary embedding of q and k fused with the KV-cache write: one launch per layer instead of two.

Per token ``t`` at ``positions[t]`` (same math as ``rotary.apply_rotary``, fp32, one rounding):

* ``q[t]`` is rotated in place (attention reads it next);
* ``k[t]`` is rotated and written, with ``v[t]`` as is, to cache slot ``slot_mapping[t]``
  (layout of ``kv_write``: ``kv_layer [2, num_blocks, block_size, Hkv, D]``); ``k`` itself is left
  unrotated, since attention reads keys only from the cache. A negative slot (graph padding) writes
  nothing.

The result in ``q`` and in the cache is bit-identical to ``apply_rotary`` followed by ``kv_write``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import FLOAT_DTYPES, check_device, check_tensor, next_pow2
from engine.kernels.kv_write import kv_write_ref
from engine.kernels.rotary import apply_rotary_ref, rotate_heads


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    cache_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    BLOCK_SIZE: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    # One program per token: its q heads, and its K/V rows into the cache.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + i).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + i).to(tl.float32)
    rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, Q_HEADS_PAD, HALF)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        heads = tl.arange(0, KV_HEADS_PAD)
        mask = heads[:, None] < NUM_KV_HEADS
        dst = cache_ptr + (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot
        dst = dst + heads[:, None] * stride_c_head + i[None, :]
        k1_ptr = k_ptr + t * stride_kt + heads[:, None] * stride_kh + i[None, :]
        k1 = tl.load(k1_ptr, mask=mask, other=0.0)
        k2 = tl.load(k1_ptr + HALF, mask=mask, other=0.0)
        f1 = k1.to(tl.float32)
        f2 = k2.to(tl.float32)
        tl.store(dst, (f1 * cos[None, :] - f2 * sin[None, :]).to(k1.dtype), mask=mask)
        tl.store(dst + HALF, (f2 * cos[None, :] + f1 * sin[None, :]).to(k1.dtype), mask=mask)
        v1_ptr = v_ptr + t * stride_vt + heads[:, None] * stride_vh + i[None, :]
        dst_v = dst + stride_c_kv
        tl.store(dst_v, tl.load(v1_ptr, mask=mask), mask=mask)
        tl.store(dst_v + HALF, tl.load(v1_ptr + HALF, mask=mask), mask=mask)


def rotary_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate ``q [T, Hq, D]`` in place; write rotated ``k`` and ``v [T, Hkv, D]`` into ``kv_layer``
    at ``slot_mapping [T]`` (int64). ``cos``/``sin``: ``[max_position, D/2]``; positions are not
    range-checked on the device (they must be < ``cos.shape[0]``), nor are slots."""
    device = check_device(q)
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("kv_layer", kv_layer, ndim=5, dtypes=(q.dtype,), device=device)
    _, _, block_size, num_kv_heads, head_dim = kv_layer.shape
    if kv_layer.shape[0] != 2:
        raise ValueError(f"kv_layer must be [2, num_blocks, block_size, Hkv, D], got {tuple(kv_layer.shape)}")
    num_tokens, num_q_heads = q.shape[0], q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q must be [T, Hq, {head_dim}] to match kv_layer, got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=(q.dtype,), device=device)
        if t.shape != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [{num_tokens}, {num_kv_heads}, {head_dim}], got {tuple(t.shape)}")
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous along the head dim")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous along the head dim")
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=device)
    if positions.shape[0] != num_tokens or slot_mapping.shape[0] != num_tokens:
        raise ValueError(
            f"positions and slot_mapping need {num_tokens} entries, got {positions.shape[0]} and {slot_mapping.shape[0]}"
        )
    half = head_dim // 2
    if head_dim % 2 or half & (half - 1):
        raise ValueError(f"head_dim must be even with a power-of-two half, got {head_dim}")
    check_tensor("cos", cos, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("sin", sin, ndim=2, dtypes=(cos.dtype,), device=device)
    if cos.shape[1] != half or sin.shape != cos.shape:
        raise ValueError(
            f"cos and sin must both be [max_position, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if kv_layer.stride(4) != 1:
        raise ValueError("kv_layer must be contiguous along the head dim")
    if num_tokens == 0:
        return
    _rotary_kv_write_kernel[(num_tokens,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        kv_layer,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        sin.stride(0),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        kv_layer.stride(3),
        BLOCK_SIZE=block_size,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        Q_HEADS_PAD=next_pow2(num_q_heads),
        KV_HEADS_PAD=next_pow2(num_kv_heads),
        HALF=half,
        num_warps=4,
    )


def rotary_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Plain-torch reference of :func:`rotary_kv_write` (``k`` left as it was)."""
    k_rot = k.clone()
    apply_rotary_ref(q, k_rot, positions, cos, sin)
    kv_write_ref(k_rot, v, kv_layer, slot_mapping)
