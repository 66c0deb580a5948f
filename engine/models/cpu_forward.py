"""The CPU forward of a Llama-family model: the module path's ops, called in one flat loop.

On CPU a decode step of a small model is bound by host overhead per op, not by arithmetic: at
batch 1, SmolLM2-135M's 30 layers run ~40 torch calls each, plus ~9 ``nn.Module.__call__``s (each
a few microseconds of hook checks). ``cpu_forward`` runs exactly the ops of
``LlamaForCausalLM.forward`` with ``TorchOps`` (same kernels, same order, same inputs, so outputs
are bit-identical: tests/engine/test_cpu_fast_paths.py) but calls them directly:

  * linears through their ``forward`` (whatever they are: ``nn.Linear``, ``Int4Linear``, ...) and
    norms as ``weight * rms_norm(x)``, the very formula of ``RMSNorm``'s CPU branch;
  * rotary over q's and k's heads as one view of the fused qkv output (they are adjacent there:
    what ``TorchOps.rotary`` checks for on every call, known here), tables gathered once per step.

Only the CPU runner with ``TorchOps`` uses it (``ModelRunner``); the module path stays the model's
definition, the reference for this one and the path of every other device and op set.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.models.layers import apply_rotary
from engine.models.llama import LlamaForCausalLM


def cpu_forward(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,  # [T]
    positions: torch.Tensor,  # [T]
    kv_cache: torch.Tensor,  # [L, 2, num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    attn: AttentionBackend,
) -> torch.Tensor:  # [T, H], the final norm applied
    layers = model.layers
    first = layers[0].self_attn
    hq, hkv, d = first.num_heads, first.num_kv_heads, first.head_dim
    q_size, kv_size, scale = first.q_size, first.kv_size, first.scale
    norms = [layer.input_layernorm for layer in layers] + [model.norm]
    residual = model.embed_tokens.forward(input_ids)  # [T, H]
    t, hidden = residual.shape
    shape = (hidden,)
    h = norms[0].weight * torch.rms_norm(residual, shape, None, norms[0].eps)
    cos, sin = model.rope.tables(positions, h.dtype)  # [T, 1, D], shared by every layer
    for i, layer in enumerate(layers):
        sa, mlp, post = layer.self_attn, layer.mlp, layer.post_attention_layernorm
        qkv = sa.qkv_proj.forward(h)  # [T, q_size + 2 kv_size]
        qk = apply_rotary(qkv[:, : q_size + kv_size].view(t, hq + hkv, d), cos, sin)  # [T, Hq + Hkv, D]
        v = qkv[:, q_size + kv_size :].view(t, hkv, d)
        attn.write_kv(qk[:, hq:], v, kv_cache[i], meta.slot_mapping)
        o = attn.attend(qk[:, :hq], kv_cache[i], meta, scale)  # [T, Hq, D]
        residual = residual + sa.o_proj.forward(o.reshape(t, q_size))
        h = post.weight * torch.rms_norm(residual, shape, None, post.eps)
        gate_up = mlp.gate_up_proj.forward(h)  # [T, 2 I]
        n = mlp.intermediate_size
        residual = residual + mlp.down_proj.forward(F.silu(gate_up[:, :n]) * gate_up[:, n:])
        nxt = norms[i + 1]
        h = nxt.weight * torch.rms_norm(residual, shape, None, nxt.eps)
    return h
