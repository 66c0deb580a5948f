"""Weight loading: every source (HF safetensors folder, GGUF file, random "dummy" weights) becomes one
``LoadedWeights`` with HF transformers parameter names and an HF ``config.json`` dict.

The GGUF loader is imported lazily: the ``gguf`` package is only needed when a GGUF file is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.weights.dummy import DUMMY_SHAPES, dummy_hf_config, dummy_weights
from engine.weights.loaded import LoadedWeights, expected_shapes, validate_weights
from engine.weights.safetensors_loader import load_hf_folder

if TYPE_CHECKING:
    from engine.model_source import ModelSource

__all__ = [
    "DUMMY_SHAPES",
    "LoadedWeights",
    "dummy_hf_config",
    "dummy_weights",
    "expected_shapes",
    "load_hf_folder",
    "load_weights",
    "validate_weights",
]


def load_weights(
    source: ModelSource, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0
) -> LoadedWeights:
    """Load ``source`` onto ``device`` in ``dtype``. ``seed`` only matters for dummy weights."""
    if source.kind == "hf_folder":
        return load_hf_folder(source.path, dtype, device)
    if source.kind == "gguf":
        from engine.weights.gguf_loader import load_gguf

        return load_gguf(source.path, dtype, device)
    if source.kind == "dummy":
        return dummy_weights(source.path, dtype, device, seed)
    raise ValueError(f"unknown model source kind {source.kind!r}")
