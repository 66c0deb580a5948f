"""Rotary fused with the KV-cache write against the two separate kernels and the torch reference."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.kv_write import kv_write
from engine.kernels.rotary import apply_rotary, rotary_cos_sin
from engine.kernels.rotary_kv_write import rotary_kv_write, rotary_kv_write_ref
from tests.engine.kernels.paged_cases import rel_err, requires_cuda


def _case(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, block_size):
    cos, sin = rotary_cos_sin(head_dim, 4096, 10000.0, device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    # q, k, v as the model has them: strided views into one fused qkv projection output.
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
    num_blocks = 2 * num_tokens // block_size + 3
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[::4] = -1  # padding rows write nothing
    return qkv, positions, cos, sin, cache, slots


def _views(qkv, num_heads, num_kv_heads):
    return qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads :]


def _check(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, block_size):
    qkv, positions, cos, sin, cache, slots = _case(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, block_size)
    fused_qkv, split_qkv, ref_qkv = qkv.clone(), qkv.clone(), qkv.clone()
    fused_cache, split_cache, ref_cache = cache.clone(), cache.clone(), cache.clone()

    q, k, v = _views(fused_qkv, num_heads, num_kv_heads)
    rotary_kv_write(q, k, v, positions, cos, sin, fused_cache, slots)
    # k is not rotated in place (attention reads keys from the cache), v untouched.
    assert torch.equal(fused_qkv[:, num_heads:], qkv[:, num_heads:])
    # The torch reference: fp32 math, one rounding (the kernels' bound: bf16 1e-2, fp32 1e-4).
    rq, rk, rv = _views(ref_qkv, num_heads, num_kv_heads)
    rotary_kv_write_ref(rq, rk, rv, positions, cos, sin, ref_cache, slots)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel_err(q, rq) <= tol
    assert rel_err(fused_cache, ref_cache) <= tol
    # The two kernels it replaces: the same values (bit for bit in the interpreter; a compiled kernel
    # may contract the rotation's multiply-adds differently, a last-bit difference).
    sq, sk, sv = _views(split_qkv, num_heads, num_kv_heads)
    apply_rotary(sq, sk, positions, cos, sin)
    kv_write(sk, sv, split_cache, slots)
    if device.type == "cuda":
        assert rel_err(q, sq) <= tol and rel_err(fused_cache, split_cache) <= tol
    else:
        assert torch.equal(q, sq) and torch.equal(fused_cache, split_cache)


@pytest.mark.parametrize(
    ("dtype", "num_tokens", "num_heads", "num_kv_heads", "head_dim", "block_size"),
    [
        (torch.bfloat16, 7, 4, 1, 64, 16),  # GQA 4
        (torch.float32, 5, 8, 1, 128, 16),  # GQA 8
        (torch.bfloat16, 9, 3, 3, 64, 8),  # GQA 1, non-power-of-two heads
    ],
)
def test_rotary_kv_write_matches_separate_kernels_small(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, block_size):
    _check(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, block_size)


def test_rotary_kv_write_rejects_bad_inputs(device):
    qkv, positions, cos, sin, cache, slots = _case(device, torch.float32, 3, 4, 2, 64, 16)
    q, k, v = _views(qkv, 4, 2)
    with pytest.raises(ValueError, match="slot_mapping must have dtype"):
        rotary_kv_write(q, k, v, positions, cos, sin, cache, slots.int())
    with pytest.raises(ValueError, match="v must be"):
        rotary_kv_write(q, k, v[:, :1], positions, cos, sin, cache, slots)
    with pytest.raises(ValueError, match="positions and slot_mapping need 3 entries"):
        rotary_kv_write(q, k, v, positions[:2], cos, sin, cache, slots)
    with pytest.raises(ValueError, match="kv_layer must have dtype"):
        rotary_kv_write(q, k, v, positions, cos, sin, cache.half(), slots)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (32, 8, 64), (14, 2, 64), (8, 8, 128)])
def test_rotary_kv_write_matches_separate_kernels_gpu(device, dtype, num_heads, num_kv_heads, head_dim):
    _check(device, dtype, 1031, num_heads, num_kv_heads, head_dim, 16)
