"""Weight-only int8 quantization (per output channel), a CPU fast path for small batches.

Decode at small batch streams every weight once per step, so bytes decide the speed: int8 weights
move a quarter of the fp32 bytes. ``Int8Linear`` keeps

  * int8 weights + one scale per output row, used when a step has few rows (decode), through
    ``aten._weight_int8pack_mm`` with bf16 activations (the fast CPU kernel for it), and
  * a bf16 copy of the dequantized weights for many-row steps (prefill), where bf16 matrix units win,
    pre-packed for oneDNN where torch can (``packed_bf16``, bit-identical to ``F.linear`` on it).

Outputs are not bit-identical to the float model (weights are rounded to 8 bits); the float path
stays the default and is the one tested token-for-token against HF transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.quantization.packed_bf16 import pack_bf16

SMALL_BATCH_ROWS = 16  # at or below: int8 kernel; above: bf16 matmul


class Int8Linear(nn.Module):
    """``max_int8_rows``: steps of at most this many rows use the int8 kernel, larger ones bf16."""

    def __init__(self, linear: nn.Linear, max_int8_rows: int = SMALL_BATCH_ROWS) -> None:
        super().__init__()
        self.max_int8_rows = max_int8_rows
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)
        self.register_buffer("weight_bf16", (q.float() * scale[:, None]).to(torch.bfloat16), persistent=False)
        self._packed_bf16 = pack_bf16(self.weight_bf16)  # None: F.linear on weight_bf16
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if x2.shape[0] <= self.max_int8_rows:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        elif self._packed_bf16 is not None:
            y = self._packed_bf16(x2)
        else:
            y = torch.nn.functional.linear(x2, self.weight_bf16)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + (self.bias if self.bias.dtype == y.dtype else self.bias.to(y.dtype))
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
