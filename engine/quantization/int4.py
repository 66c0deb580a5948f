"""4-bit weight-only linears in the Q4_1 layout: the CPU fast path.

A weight row is cut into groups of 32 along the input dimension; group ``g`` stores 4-bit codes
``q in [0, 15]``, a scale ``d`` and a minimum ``m``, and ``w = d * q + m`` (GGML's Q4_1, so a GGUF
file's Q4_1 tensors are used as they are, without requantizing). ``Int4Linear`` keeps

  * the packed codes for torch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``), used for
    steps of few rows (decode), where reading the weights decides the speed. The kernel's
    convention is ``w = (q - 8) * scale + zero``, so ``scale = d`` and ``zero = m + 8 d``. The kernel
    is fast only with bf16 activations, which also means bf16 ``scale``/``zero``: ``d`` and ``m``
    come as fp16 in GGUF files and are rounded to bf16 there (the codes are kept exactly);
  * a bf16 copy of the exact dequantized weights for many-row steps (prefill, large decode
    batches), where the bf16 matrix units beat any 4-bit kernel, pre-packed for oneDNN where torch
    can (``packed_bf16``: bit-identical to ``F.linear`` on that copy, without its per-call reorder).

Both paths take and return bf16 activations internally; a float32 model still works (its inputs
are cast per call), but a bf16 model avoids the casts and halves the KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.quantization.packed_bf16 import pack_bf16

GROUP_SIZE = 32
# At or below this many rows a step uses the int4 kernel, above it the bf16 matmul (measured on a
# 2-core Sapphire Rapids: the int4 kernel wins at 1-4 rows, bf16 from 8 on).
INT4_MAX_ROWS = 4
_N_MULTIPLE = 16  # the int4 packing needs a multiple of 16 output rows


def quantize_q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float weights ``[N, K]`` -> Q4_1 ``(codes uint8 [N, K], d fp32 [N, K/32], m fp32 [N, K/32])``.

    GGML's recipe: per group ``m = min``, ``d = (max - min) / 15``, codes rounded from the unrounded
    ``m``/``d``, then ``d`` and ``m`` stored as fp16 (returned here as the fp32 values of those fp16s).
    """
    n, k = w.shape
    if k % GROUP_SIZE:
        raise ValueError(f"input size {k} is not a multiple of the group size {GROUP_SIZE}")
    groups = w.detach().float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    lo = groups.amin(dim=-1)
    d = (groups.amax(dim=-1) - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = torch.trunc((groups - lo[..., None]) * inv[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
    return codes.reshape(n, k), d.half().float(), lo.half().float()


def dequantize_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``w = d * q + m`` in fp32, exactly as GGML dequantizes Q4_1 (one rounding, at the add)."""
    n, k = codes.shape
    q = codes.reshape(n, k // GROUP_SIZE, GROUP_SIZE).float()
    return (d[..., None] * q + m[..., None]).reshape(n, k)


class Int4Linear(nn.Module):
    """``y = x W^T (+ bias)`` with ``W`` held as Q4_1 codes (see the module docstring)."""

    def __init__(
        self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        n, k = codes.shape
        if k % GROUP_SIZE or d.shape != (n, k // GROUP_SIZE) or m.shape != d.shape:
            raise ValueError(f"Q4_1 codes {tuple(codes.shape)} do not match scales {tuple(d.shape)}")
        self.in_features, self.out_features = k, n
        d, m = d.float(), m.float()
        self.register_buffer("weight_bf16", dequantize_q4_1(codes, d, m).to(torch.bfloat16), persistent=False)
        self._packed_bf16 = pack_bf16(self.weight_bf16)  # None: F.linear on weight_bf16
        # The packing needs N % 16 == 0: pad with rows whose weights are 0 (q = 8, scale = zero = 0).
        pad = -n % _N_MULTIPLE
        if pad:
            codes = torch.cat([codes, torch.full((pad, k), 8, dtype=codes.dtype)])
            d = torch.cat([d, d.new_zeros(pad, d.shape[1])])
            m = torch.cat([m, m.new_zeros(pad, m.shape[1])])
        self._padded_n = n + pad
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed, persistent=False)
        # [K/32, N, 2]: (scale, zero) per group and output row, the kernel's layout.
        scales_and_zeros = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros_fp32", scales_and_zeros, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int4Linear:
        """Quantize a float linear with GGML's Q4_1 recipe."""
        codes, d, m = quantize_q4_1(linear.weight)
        return cls(codes, d, m, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checks in Python rather than no-op reshapes/casts: at decode every dispatch counts.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if x2.shape[0] <= INT4_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP_SIZE, self.scales_and_zeros)
            if self._padded_n != self.out_features:
                y = y[:, : self.out_features]
        elif self._packed_bf16 is not None:
            y = self._packed_bf16(x2)
        else:
            y = nn.functional.linear(x2, self.weight_bf16)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + (self.bias if self.bias.dtype == y.dtype else self.bias.to(y.dtype))
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weights the packed codes hold, read back through torch's int4 kernel itself
        (identity input, fp32 scale/zero): ``d * q + m`` of every group, exactly."""
        eye = torch.eye(self.in_features)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, GROUP_SIZE, self.scales_and_zeros_fp32
        )
        return w_t.t()[: self.out_features].contiguous()
