"""SiLU-and-mul: the gated MLP activation ``silu(gate) * up`` on a fused gate/up projection.

``x [T, 2I]`` holds the gate in its first half and up in its second; returns ``[T, I]``.
Numerics follow an eager bf16 model: ``silu`` in fp32 rounded to the input dtype, then the product
in fp32 rounded once more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import FLOAT_DTYPES, check_device, check_tensor


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(
        out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask
    )


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [T, 2I]`` -> ``silu(x[:, :I]) * x[:, I:]`` of shape ``[T, I]``."""
    device = check_device(x)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if x.shape[1] % 2:
        raise ValueError(f"x's last dim must be even (gate | up), got {x.shape[1]}")
    inter = x.shape[1] // 2
    if out is None:
        out = torch.empty((x.shape[0], inter), dtype=x.dtype, device=device)
    else:
        check_tensor("out", out, ndim=2, dtypes=(x.dtype,), device=device)
        if out.shape != (x.shape[0], inter):
            raise ValueError(f"out must be [{x.shape[0]}, {inter}], got {tuple(out.shape)}")
    if x.shape[0] == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024)
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=4
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference of :func:`silu_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
