"""Weight-only int8 quantization (per output channel), the CPU fast path for small batches.

Decode at small batch streams every weight once per step, so bytes decide the speed: int8 weights
move a quarter of the fp32 bytes. ``Int8Linear`` keeps

  * int8 weights + one scale per output row, used when a step has few rows (decode), through
    ``aten._weight_int8pack_mm`` with bf16 activations (the fast CPU kernel for it), and
  * a bf16 copy of the dequantized weights for many-row steps (prefill), where bf16 matrix units win.

Outputs are not bit-identical to the float model (weights are rounded to 8 bits); the float path
stays the default and is the one tested token-for-token against HF transformers.
"""

from __future__ import annotations

import torch
from torch import nn

SMALL_BATCH_ROWS = 16  # at or below: int8 kernel; above: bf16 matmul


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)
        self.register_buffer("weight_bf16", (q.float() * scale[:, None]).to(torch.bfloat16), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if x2.shape[0] <= SMALL_BATCH_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        else:
            y = torch.nn.functional.linear(x2, self.weight_bf16)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int8_weight_only(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (lm_head included; embeddings stay float) in place."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 weight-only quantization is implemented for the CPU path only")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model
