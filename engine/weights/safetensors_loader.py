"""Load an HF model folder: ``config.json`` plus ``*.safetensors`` (single file or sharded).

Pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``) are refused, never opened: unpickling a file runs
arbitrary code, and safetensors carries the same tensors without that risk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.weights.loaded import LoadedWeights, validate_weights

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_INDEX_FILE = "model.safetensors.index.json"


def load_hf_folder(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> LoadedWeights:
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder}: not an HF model folder (no config.json)")
    hf_config = json.loads(config_file.read_text())
    tied = bool(hf_config.get("tie_word_embeddings", False))

    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer some old checkpoints saved; recomputed from the config
                if tied and name == "lm_head.weight":
                    continue  # tied: the model shares embed_tokens, the copy is redundant
                tensors[name] = f.get_tensor(name).to(dtype)
    return validate_weights(LoadedWeights(hf_config=hf_config, tensors=tensors), str(folder))


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of ``folder``; raises ``ValueError`` for pickle-only or empty folders."""
    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index}: lists shards that are not in the folder: {absent}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder}: refusing to load pickle checkpoint {pickles[0]}"
            f"{f' (and {len(pickles) - 1} more)' if len(pickles) > 1 else ''}: unpickling can run arbitrary "
            "code. Convert it to safetensors (e.g. save_pretrained(..., safe_serialization=True))."
        )
    raise ValueError(f"{folder}: no *.safetensors weights found")
