"""RMSNorm, fused add + RMSNorm, rotary embedding and SiLU-and-mul against their torch references."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.activation import silu_and_mul, silu_and_mul_ref
from engine.kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from engine.kernels.rotary import apply_rotary, apply_rotary_ref, rotary_cos_sin
from tests.engine.kernels.paged_cases import TOLERANCE, rel_err, requires_cuda

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _check_norms(device, dtype, num_tokens, hidden):
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    residual = torch.randn(num_tokens, hidden, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    eps = 1e-6
    assert rel_err(rms_norm(x, weight, eps), rms_norm_ref(x, weight, eps)) <= TOLERANCE[dtype]

    x_before = x.clone()
    res_kernel, res_ref = residual.clone(), residual.clone()
    out = fused_add_rms_norm(x, res_kernel, weight, eps)
    want = fused_add_rms_norm_ref(x, res_ref, weight, eps)
    assert rel_err(out, want) <= TOLERANCE[dtype]
    if device.type == "cuda":
        assert torch.equal(res_kernel, res_ref), "residual must become x + residual, rounded to the dtype"
    else:  # the CPU interpreter truncates fp32 -> bf16/fp16 instead of rounding to nearest
        assert rel_err(res_kernel, res_ref) <= TOLERANCE[dtype]
    assert torch.equal(x, x_before), "x must not be written"


def _check_rotary(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    cos, sin = rotary_cos_sin(head_dim, 4096, 10000.0, device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]  # strided views
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, num_heads + num_kv_heads :].clone()
    apply_rotary(q, k, positions, cos, sin)
    apply_rotary_ref(q_ref, k_ref, positions, cos, sin)
    assert rel_err(q, q_ref) <= TOLERANCE[dtype]
    assert rel_err(k, k_ref) <= TOLERANCE[dtype]
    assert torch.equal(qkv[:, num_heads + num_kv_heads :], v_before), "rotary must only touch q and k"


def _check_silu(device, dtype, num_tokens, inter):
    x = torch.randn(num_tokens, 2 * inter, device=device).to(dtype)
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_small(device, dtype):
    _check_norms(device, dtype, 5, 96)


def test_rotary_matches_hf_rotate_half(device):
    """The kernel equals HF's ``x * cos + rotate_half(x) * sin`` with duplicated cos/sin."""
    cos, sin = rotary_cos_sin(64, 128, 10000.0, device)
    positions = torch.tensor([0, 5, 127], device=device)
    q = torch.randn(3, 4, 64, device=device)
    k = torch.randn(3, 2, 64, device=device)
    c = torch.cat((cos, cos), -1)[positions][:, None]
    s = torch.cat((sin, sin), -1)[positions][:, None]

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    want_q, want_k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    apply_rotary(q, k, positions.int(), cos, sin)
    assert rel_err(q, want_q) <= 1e-6 and rel_err(k, want_k) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_small(device, dtype):
    _check_rotary(device, dtype, 7, 4, 2, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_small(device, dtype):
    _check_silu(device, dtype, 3, 80)


def test_pointwise_reject_bad_inputs(device):
    with pytest.raises(ValueError, match="weight has 3 entries"):
        rms_norm(torch.randn(2, 4, device=device), torch.ones(3, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual must have dtype"):
        fused_add_rms_norm(
            torch.randn(2, 4, device=device),
            torch.randn(2, 4, device=device).half(),
            torch.ones(4, device=device),
            1e-6,
        )
    with pytest.raises(ValueError, match="last dim must be even"):
        silu_and_mul(torch.randn(2, 5, device=device))
    cos, sin = rotary_cos_sin(64, 16, 10000.0, device)
    with pytest.raises(ValueError, match="positions has 1 entries"):
        apply_rotary(
            torch.randn(2, 2, 64, device=device),
            torch.randn(2, 1, 64, device=device),
            torch.zeros(1, dtype=torch.long, device=device),
            cos,
            sin,
        )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 2048, 4096, 8192])
def test_norms_gpu(device, dtype, hidden):
    _check_norms(device, dtype, 1027, hidden)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64), (14, 2, 64)])
def test_rotary_gpu(device, dtype, num_heads, num_kv_heads, head_dim):
    _check_rotary(device, dtype, 1027, num_heads, num_kv_heads, head_dim)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1536, 8192, 14336])
def test_silu_and_mul_gpu(device, dtype, inter):
    _check_silu(device, dtype, 515, inter)
