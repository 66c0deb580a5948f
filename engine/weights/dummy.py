"""Random weights of a real model's shape, for speed measurements and tests.

Values are drawn on the target device (an 8B model is ~16 GB in bf16: generating it on the CPU and
copying would take minutes). Init as HF does: weights and biases ~ N(0, 0.02), RMSNorm weights = 1,
so activations stay in a sane range through every layer. Same seed + device + dtype -> same weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from engine.weights.loaded import LoadedWeights, expected_shapes

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA3_ROPE |= {"original_max_position_embeddings": 8192}


def _llama(**kw: Any) -> dict[str, Any]:
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
    base |= {"attention_bias": False, "rms_norm_eps": 1e-5}
    return base | kw


def _qwen2(**kw: Any) -> dict[str, Any]:
    base = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu"}
    base |= {"use_sliding_window": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
    return base | kw


# Shapes of public checkpoints (from their config.json), plus tiny ones for tests. The tiny shapes use
# SmolLM2's vocabulary size so the default model's tokenizer can drive them.
DUMMY_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": _llama(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE | {"factor": 32.0}, max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    ),
    "llama-3.1-8b": _llama(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE | {"factor": 8.0}, max_position_embeddings=131072,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    ),
    "qwen2.5-0.5b": _qwen2(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    ),
    "smollm2-135m": _llama(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    "tiny-llama": _llama(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "tiny-qwen2": _qwen2(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
}  # fmt: skip


def dummy_hf_config(shape: str) -> dict[str, Any]:
    """The HF config dict of a named dummy shape (a fresh copy); ``ValueError`` lists known names."""
    key = shape.lower()
    if key not in DUMMY_SHAPES:
        raise ValueError(f"unknown dummy shape {shape!r}; known shapes: {', '.join(DUMMY_SHAPES)}")
    return copy.deepcopy(DUMMY_SHAPES[key])


def dummy_weights(
    shape_or_hf_config: str | dict[str, Any],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedWeights:
    if isinstance(shape_or_hf_config, str):
        hf_config = dummy_hf_config(shape_or_hf_config)
    else:
        hf_config = copy.deepcopy(shape_or_hf_config)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(hf_config).items():  # fixed order -> reproducible per seed
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            tensors[name] = torch.empty(shape, dtype=dtype, device=device).normal_(
                0.0, 0.02, generator=generator
            )
    return LoadedWeights(hf_config=hf_config, tensors=tensors)
