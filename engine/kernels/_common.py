"""Helpers shared by the kernel launchers: argument checks with clear errors, device facts.

Launchers only look at shapes, strides, dtypes and devices (host metadata), never at tensor
values, so they add no device->host sync and stay CUDA-graph capturable.
"""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_upcast() -> bool:
    """Whether kernels must upcast ``tl.dot`` operands to fp32.

    The CPU interpreter multiplies bf16 operands as their raw 16-bit patterns (it stores bf16 as
    uint16), which gives garbage; fp32 operands are exact there. On the GPU the native dtype is used.
    """
    return interpreting()


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return _TL_DTYPES[dtype]


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device,
    last_dim_contiguous: bool = True,
) -> None:
    """Raise ``ValueError`` naming the argument when ``t`` has the wrong rank, dtype or device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the kernel runs on {device}")
    if last_dim_contiguous and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_device(t: torch.Tensor) -> torch.device:
    """The device the kernel runs on; CPU tensors only under the Triton interpreter."""
    if t.device.type == "cuda":
        return t.device
    if t.device.type == "cpu" and interpreting():
        return t.device
    raise ValueError(
        f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got a {t.device} tensor"
    )


def check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 132 under the CPU interpreter)."""
    if device.type != "cuda":
        return 132
    return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())
