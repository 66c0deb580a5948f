"""Rotary position embedding (neox / HF Llama "rotate half" style), applied to q and k in place.

For each head vector ``x`` with halves ``x1 = x[:D/2]``, ``x2 = x[D/2:]`` at position ``p``::

    out1 = x1 * cos[p] - x2 * sin[p]
    out2 = x2 * cos[p] + x1 * sin[p]

which is HF's ``x * cos + rotate_half(x) * sin`` with ``cos``/``sin`` of width D/2 (HF stores the
same D/2 values twice). ``cos``/``sin`` caches are ``[max_position, D/2]`` (fp32 recommended; any
rope scaling is folded into them by whoever builds them). Math in fp32, one rounding at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import FLOAT_DTYPES, check_device, check_tensor, next_pow2


@triton.jit
def rotate_heads(
    x_ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr
):
    """Rotate ``NUM_HEADS`` head vectors at ``x_ptr`` (``stride_h`` apart) in place, fp32 math."""
    heads = tl.arange(0, HEADS_PAD)
    i = tl.arange(0, HALF)
    mask = heads[:, None] < NUM_HEADS
    p1 = x_ptr + heads[:, None] * stride_h + i[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    tl.store(p1, (f1 * cos[None, :] - f2 * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(p1 + HALF, (f2 * cos[None, :] + f1 * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    # One program per token: every q and k head of that token share one cos/sin row.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + i).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + i).to(tl.float32)
    rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, Q_HEADS_PAD, HALF)
    rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, K_HEADS_PAD, HALF)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place by ``positions [T]`` (int32/int64).

    Positions are not range-checked on the device; they must be < ``cos.shape[0]``.
    """
    device = check_device(q)
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=device)
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    check_tensor("cos", cos, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("sin", sin, ndim=2, dtypes=(cos.dtype,), device=device)
    num_tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k must be [{num_tokens}, Hkv, {head_dim}] to match q, got {tuple(k.shape)}")
    if positions.shape[0] != num_tokens:
        raise ValueError(f"positions has {positions.shape[0]} entries for {num_tokens} tokens")
    half = head_dim // 2
    if head_dim % 2 or half & (half - 1):
        raise ValueError(f"head_dim must be even with a power-of-two half, got {head_dim}")
    if cos.shape[1] != half or sin.shape != cos.shape:
        raise ValueError(
            f"cos and sin must both be [max_position, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=k.shape[1],
        Q_HEADS_PAD=next_pow2(num_q_heads),
        K_HEADS_PAD=next_pow2(k.shape[1]),
        HALF=half,
        num_warps=4,
    )


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Plain-torch reference of :func:`apply_rotary` (in place, fp32 math)."""
    c = cos[positions.long()].float()[:, None, :]  # [T, 1, D/2]
    s = sin[positions.long()].float()[:, None, :]
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype))


def rotary_cos_sin(head_dim: int, max_position: int, base: float, device: torch.device | str = "cpu"):
    """Plain (unscaled) rotary tables ``cos, sin [max_position, head_dim // 2]`` in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.arange(max_position, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()
