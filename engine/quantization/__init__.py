"""Weight-only quantization of a built model, for the CPU path (``quantization=`` of the engine).

  * ``int8``: every linear (lm_head included) as int8 per output channel (``Int8Linear``).
  * ``int4``: the decoder's linears as 4-bit groups in GGML's Q4_1 layout (``Int4Linear``), taken
    from the GGUF file as stored when the model is a GGUF with Q4_1 tensors (the default model is),
    else quantized from the float weights with the same recipe; the lm_head as ``Int8Linear``.
    Run it with ``dtype="bfloat16"`` (the builder's default for this mode): its kernels compute in
    bf16, so a bf16 model avoids casts around every linear and halves the KV cache.

Embeddings and norms stay in the model dtype. Outputs are not bit-identical to the float model;
the float path stays the default and is the one tested token-for-token against HF transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.quantization.int4 import Int4Linear, dequantize_q4_1, quantize_q4_1
from engine.quantization.int8 import Int8Linear

QUANTIZATION_METHODS = ("none", "int8", "int4")
# The int4 mode's lm_head: int8 up to this many rows (decode of a few sequences), bf16 above.
LM_HEAD_INT8_MAX_ROWS = 4

__all__ = [
    "QUANTIZATION_METHODS",
    "Int4Linear",
    "Int8Linear",
    "dequantize_q4_1",
    "quantize_int4_weight_only",
    "quantize_int8_weight_only",
    "quantize_model",
    "quantize_q4_1",
]


def quantize_model(model: nn.Module, method: str | None, *, gguf_path: str | Path | None = None) -> None:
    """Apply ``method`` (``QUANTIZATION_METHODS``; None = none) to ``model`` in place.
    ``gguf_path``: the file the weights came from, whose Q4_1 tensors the int4 mode uses as stored."""
    if method in (None, "none"):
        return
    if method not in QUANTIZATION_METHODS:
        raise ValueError(
            f"unknown quantization {method!r}; expected one of {', '.join(QUANTIZATION_METHODS)}"
        )
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"{method} weight-only quantization is implemented for the CPU path only")
    if method == "int8":
        quantize_int8_weight_only(model)
        return
    blocks = {}
    if gguf_path is not None:
        from engine.quantization.gguf_q4 import read_q4_1_tensors

        blocks = read_q4_1_tensors(gguf_path)
    quantize_int4_weight_only(model, blocks)


def quantize_int8_weight_only(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (lm_head included; embeddings stay float) in place."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model


def quantize_int4_weight_only(model: nn.Module, blocks: dict | None = None) -> nn.Module:
    """Decoder linears of a Llama-family ``model`` -> ``Int4Linear``; lm_head -> ``Int8Linear``.

    ``blocks``: Q4_1 ``(codes, d, m)`` by HF tensor name (``gguf_q4.read_q4_1_tensors``). A fused
    projection uses them when every tensor it fuses is there with the right shape; otherwise its
    float weights are quantized."""
    blocks = blocks or {}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = _int4(attn.qkv_proj, [p + f"self_attn.{n}_proj.weight" for n in "qkv"], blocks)
        attn.o_proj = _int4(attn.o_proj, [p + "self_attn.o_proj.weight"], blocks)
        mlp.gate_up_proj = _int4(
            mlp.gate_up_proj, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], blocks
        )
        mlp.down_proj = _int4(mlp.down_proj, [p + "mlp.down_proj.weight"], blocks)
    model.lm_head = Int8Linear(model.lm_head, max_int8_rows=LM_HEAD_INT8_MAX_ROWS)
    return model


def _int4(linear: nn.Linear, names: list[str], blocks: dict) -> Int4Linear:
    if all(n in blocks for n in names):
        codes, d, m = (torch.cat([blocks[n][j] for n in names]) for j in range(3))
        if codes.shape == linear.weight.shape:
            return Int4Linear(codes, d, m, linear.bias)
    return Int4Linear.from_float(linear)
