"""Read a GGUF file's Q4_1 tensors as they are stored: codes, scales and minimums, HF-named.

The weight loader dequantizes everything to floats; the int4 mode wants the blocks themselves, so
the model runs at the file's own precision instead of a requantization of dequantized floats.
A Q4_1 block is 20 bytes: ``d`` (fp16), ``m`` (fp16), then 16 bytes of codes where byte ``j``
holds value ``j`` in its low nibble and value ``j + 16`` in its high nibble.
Llama's Q and K rows are put back in HF order, exactly as ``engine.weights.gguf_loader`` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

Q4_1_BLOCK_BYTES = 20
Q4_1_GROUP = 32

Q4_1Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes uint8 [N, K], d, m fp32 [N, K/32]


def unpack_q4_1(raw: np.ndarray) -> Q4_1Blocks:
    """``raw`` uint8 ``[N, K/32 * 20]`` (one GGUF Q4_1 tensor) -> ``(codes, d, m)``."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q4_1_BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]  # [N, K/32, 16]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # values 0..15 then 16..31 of each block
    return torch.from_numpy(codes.reshape(rows, -1)), torch.from_numpy(d), torch.from_numpy(m)


def read_q4_1_tensors(path: str | Path) -> dict[str, Q4_1Blocks]:
    """Every Q4_1 tensor of the file, keyed by its HF name (other types are left out)."""
    from gguf import GGMLQuantizationType, GGUFReader

    from engine.weights.gguf_config import read_metadata
    from engine.weights.gguf_loader import hf_name, unpermute_rotary_rows

    reader = GGUFReader(Path(path), "r")
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    heads = {
        "attn_q": int(meta[f"{arch}.attention.head_count"]),
        "attn_k": int(meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])),
    }
    out: dict[str, Q4_1Blocks] = {}
    for t in reader.tensors:
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        codes, d, m = unpack_q4_1(np.asarray(t.data))
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if arch == "llama" and kind in heads:  # rows are whole (groups run along a row): permute rows
            codes, d, m = (unpermute_rotary_rows(x, heads[kind]) for x in (codes, d, m))
        out[hf_name(t.name)] = (codes.contiguous(), d.contiguous(), m.contiguous())
    return out
