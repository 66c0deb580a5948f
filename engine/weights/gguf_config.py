"""GGUF metadata -> an HF ``config.json`` dict.

GGUF stores the shape under ``<arch>.*`` keys (``llama.block_count`` ...). Llama-3 style rope scaling
is not in the metadata at all: the converter bakes it into a ``rope_freqs`` tensor of per-frequency
divisors, so we recover the HF ``rope_scaling`` dict by recomputing those divisors from the known
Llama-3 recipe and checking they match.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

# GGUF architecture -> (HF architecture, HF model_type)
SUPPORTED_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value fields as Python values; arrays of strings are left out except their length."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.ARRAY:
            if key == "tokenizer.ggml.tokens":
                out["tokenizer.ggml.tokens.count"] = len(field.data)
            continue  # token/merge lists are large and only the tokenizer export needs them
        if kind == GGUFValueType.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            out[key] = field.parts[field.data[0]][0].item()
    return out


def _f32(value: float) -> float:
    # GGUF stores floats as float32; the shortest float32 repr gives back the decimal HF wrote (1e-05).
    return float(str(np.float32(value)))


def hf_config_from_gguf(
    meta: dict[str, Any], tensor_names: set[str], rope_freqs: np.ndarray | None, source: str
) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: GGUF architecture {arch!r} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})"
        )
    hf_arch, model_type = SUPPORTED_ARCHITECTURES[arch]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(
            f"{source}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported"
        )
    rope_theta = _f32(get("rope.freq_base", 10000.0))
    vocab = meta.get("tokenizer.ggml.tokens.count") or get("vocab_size")
    if vocab is None:
        raise ValueError(f"{source}: no vocabulary size (no tokenizer.ggml.tokens and no {arch}.vocab_size)")

    eos_ids = [
        meta[k]
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if k in meta
    ]
    eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(get, rope_freqs, rope_theta, head_dim, source),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"])
        if "tokenizer.ggml.bos_token_id" in meta
        else None,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
    }
    if model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    else:
        cfg["use_sliding_window"] = False
    return cfg


def _rope_scaling(get, rope_freqs, rope_theta: float, head_dim: int, source: str) -> dict[str, Any] | None:
    if rope_freqs is not None:
        return _llama3_scaling_from_freqs(
            np.asarray(rope_freqs, dtype=np.float64), rope_theta, head_dim, source
        )
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = _f32(get("rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = get("rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(orig)}
    raise ValueError(f"{source}: rope scaling type {kind!r} is not supported")


def llama3_rope_divisors(
    rope_theta: float,
    head_dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max: int,
) -> np.ndarray:
    """Per-frequency divisors of Llama-3 rope scaling (what the GGUF ``rope_freqs`` tensor stores)."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max / low_freq_factor
    high_wavelen = original_max / high_freq_factor
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    middle = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, middle))


# Every released Llama-3.x model uses these; only ``factor`` differs (8 for 3.1, 32 for 3.2).
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama3_scaling_from_freqs(
    freqs: np.ndarray, rope_theta: float, head_dim: int, source: str
) -> dict[str, Any]:
    factor = float(np.round(freqs.max(), 4))
    params = {"rope_type": "llama3", "factor": factor, **_LLAMA3_DEFAULTS}
    expected = llama3_rope_divisors(
        rope_theta,
        head_dim,
        factor,
        params["low_freq_factor"],
        params["high_freq_factor"],
        params["original_max_position_embeddings"],
    )
    if freqs.shape != expected.shape or not np.allclose(freqs, expected, rtol=1e-4):
        raise ValueError(f"{source}: rope_freqs tensor does not match Llama-3 rope scaling; unsupported")
    return params
