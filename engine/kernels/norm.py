"""Fused RMSNorm and fused residual-add + RMSNorm over the last dim.

Numerics follow HF Llama's ``LlamaRMSNorm``: the mean of squares is taken in fp32, the normalised
row is rounded to the input dtype, then multiplied by the weight (and rounded again). The fused
add rounds ``x + residual`` to the input dtype before normalising, as an eager model does.

Residual semantics of :func:`fused_add_rms_norm`: ``residual`` is updated IN PLACE to
``x + residual`` (the stream the next layer adds onto); the normalised output goes to a new tensor
(or ``out``). ``x`` is never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import FLOAT_DTYPES, check_device, check_tensor, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out):
    device = check_device(x)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=device)
    hidden = x.shape[1]
    if weight.shape[0] != hidden:
        raise ValueError(f"weight has {weight.shape[0]} entries for hidden size {hidden}")
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=device)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if out is None:
        out = torch.empty_like(x)
    else:
        check_tensor("out", out, ndim=2, dtypes=(x.dtype,), device=device)
        if out.shape != x.shape:
            raise ValueError(f"out shape {tuple(out.shape)} != x shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return out
    block = next_pow2(hidden)
    _rms_norm_kernel[(x.shape[0],)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        float(eps),
        HIDDEN=hidden,
        BLOCK=block,
        ADD_RESIDUAL=residual is not None,
        num_warps=min(max(block // 512, 1), 16),
    )
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [T, H]`` -> ``weight * x / sqrt(mean(x^2) + eps)`` in ``x``'s dtype."""
    return _launch(x, None, weight, eps, out)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual <- x + residual`` (in place); returns ``rms_norm(residual)``. ``x`` is left intact."""
    if residual is None:
        raise ValueError("residual is required for fused_add_rms_norm")
    return _launch(x, residual, weight, eps, out)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch reference (the HF Llama formula)."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Reference of :func:`fused_add_rms_norm`, with the same in-place update of ``residual``."""
    residual.copy_((x.float() + residual.float()).to(x.dtype))
    return rms_norm_ref(residual, weight, eps)
