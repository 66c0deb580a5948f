"""Load a GGUF file (llama / qwen2 architectures) into HF-named, dequantized tensors.

llama.cpp's converter reorders the rows of the Llama Q and K projections so that each head's rotary
pairs are interleaved (GGML's rope layout) instead of split in halves (HF's layout). We undo that, so
the result is interchangeable with the HF checkpoint. Qwen2 is written without the reordering.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from engine.weights.gguf_config import hf_config_from_gguf, read_metadata
from engine.weights.loaded import LoadedWeights, validate_weights

Q = GGMLQuantizationType
# Types we dequantize (each covered by a test); anything else is refused by name.
SUPPORTED_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its HF transformers name; ``ValueError`` for unknown names."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute_rotary_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K reordering: per head, rows (d/2, 2) interleaved -> (2, d/2) halves."""
    rows = w.shape[0]
    head_dim = rows // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize_tensor(data: np.ndarray, qtype: GGMLQuantizationType, name: str) -> np.ndarray:
    """Raw GGUF tensor data -> float32 array shaped [rows, cols] (HF order)."""
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"GGUF tensor {name} uses type {qtype.name}, which is not supported ({supported})")
    out = np.asarray(dequantize(data, qtype), dtype=np.float32)
    # F32 data comes back as a view of the read-only file mapping; tensors must own their memory.
    return out if out.flags.writeable else out.copy()


def load_gguf(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> LoadedWeights:
    path = Path(path)
    reader = GGUFReader(path, "r")
    meta = read_metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    rope = by_name.pop("rope_freqs.weight", None)
    rope_freqs = dequantize_tensor(rope.data, rope.tensor_type, rope.name) if rope is not None else None
    hf_config = hf_config_from_gguf(meta, set(by_name), rope_freqs, str(path))
    permuted = hf_config["model_type"] == "llama"
    heads = {"attn_q": hf_config["num_attention_heads"], "attn_k": hf_config["num_key_value_heads"]}

    hf_names = {name: hf_name(name) for name in by_name}  # fail on unknown tensors before the slow part
    tensors: dict[str, torch.Tensor] = {}
    total = sum(int(t.n_elements) for t in by_name.values())
    with tqdm(
        total=total, unit="param", unit_scale=True, desc=f"dequantizing {path.name}", disable=None
    ) as bar:
        for name, t in by_name.items():
            value = torch.from_numpy(dequantize_tensor(t.data, t.tensor_type, name))
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            if permuted and kind in heads:
                value = unpermute_rotary_rows(value, heads[kind])
            tensors[hf_names[name]] = value.to(device=device, dtype=dtype)
            bar.update(int(t.n_elements))
    return validate_weights(LoadedWeights(hf_config=hf_config, tensors=tensors), str(path))
