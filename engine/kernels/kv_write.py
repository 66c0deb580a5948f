"""KV-cache write: scatter the step's new keys and values into their cache blocks.

Cache layout (``engine/attention/base.py``): ``kv_layer [2, num_blocks, block_size, Hkv, D]``;
token ``t`` goes to slot ``slot_mapping[t] = block_id * block_size + offset``. A negative slot
marks a padding token (e.g. CUDA-graph batch padding) and is skipped.

Slots are not range-checked on the device (that would need a sync); the scheduler owns them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import FLOAT_DTYPES, check_device, check_tensor, next_pow2


@triton.jit
def _kv_write_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    # One program per token: all heads' K and V rows of that token.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        block_id = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        heads = tl.arange(0, HEADS_PAD)
        dims = tl.arange(0, DIM_PAD)
        mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
        dst = cache_ptr + block_id * stride_c_block + offset * stride_c_slot
        dst = dst + heads[:, None] * stride_c_head + dims[None, :]
        k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
        tl.store(dst, k, mask=mask)
        tl.store(dst + stride_c_kv, v, mask=mask)


def kv_write(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``k, v [T, Hkv, D]`` into ``kv_layer [2, num_blocks, block_size, Hkv, D]`` at ``slot_mapping``.

    In place on ``kv_layer``; dtypes of ``k``, ``v`` and the cache must match.
    """
    device = check_device(kv_layer)
    check_tensor("kv_layer", kv_layer, ndim=5, dtypes=FLOAT_DTYPES, device=device)
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_layer.shape
    if kv_layer.shape[0] != 2:
        raise ValueError(f"kv_layer must be [2, num_blocks, block_size, Hkv, D], got {tuple(kv_layer.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=(kv_layer.dtype,), device=device)
        if t.shape[1:] != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [T, {num_kv_heads}, {head_dim}] to match kv_layer, got {tuple(t.shape)}"
            )
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same token count, got {k.shape[0]} and {v.shape[0]}")
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=device)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    heads_pad = next_pow2(num_kv_heads)
    dim_pad = next_pow2(head_dim)
    _kv_write_kernel[(num_tokens,)](
        k,
        v,
        kv_layer,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        kv_layer.stride(3),
        BLOCK_SIZE=block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=heads_pad,
        DIM_PAD=dim_pad,
        num_warps=4 if heads_pad * dim_pad <= 2048 else 8,
    )


def kv_write_ref(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Plain-torch reference of :func:`kv_write` (in place on ``kv_layer``)."""
    block_size = kv_layer.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    kv_layer[0, blocks, offsets] = k[keep]
    kv_layer[1, blocks, offsets] = v[keep]
