"""The one thing every weight loader returns, and the check that it is complete.

Invariant of a ``LoadedWeights``: ``tensors`` holds exactly the HF transformers Llama/Qwen2 parameter
names that ``hf_config`` implies (``lm_head.weight`` absent when embeddings are tied), each with the
shape HF would give it. ``validate_weights`` enforces this, so a model can load without guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.config import ModelConfig


@dataclass(frozen=True)
class LoadedWeights:
    hf_config: dict[str, Any]  # an HF ``config.json`` dict accepted by ModelConfig.from_hf_dict
    tensors: dict[str, torch.Tensor]  # HF parameter name -> tensor

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.hf_config)


def expected_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, for a Llama-family decoder described by ``hf_config``."""
    cfg = ModelConfig.from_hf_dict(hf_config)
    q_out = cfg.num_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_out, cfg.hidden_size)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, cfg.hidden_size)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, cfg.hidden_size)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        shapes[p + "self_attn.o_proj.weight"] = (cfg.hidden_size, q_out)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, cfg.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, cfg.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (cfg.hidden_size, cfg.intermediate_size)
        shapes[p + "input_layernorm.weight"] = (cfg.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (cfg.hidden_size,)
    shapes["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def validate_weights(weights: LoadedWeights, source: str) -> LoadedWeights:
    """Raise ``ValueError`` naming ``source`` unless names and shapes are exactly what the config implies."""
    want = expected_shapes(weights.hf_config)
    have = weights.tensors
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"{source}: tensors do not match the model config "
            f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]})"
        )
    for name, shape in want.items():
        if tuple(have[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(have[name].shape)}, expected {shape}")
    return weights
