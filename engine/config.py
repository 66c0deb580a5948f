"""Model and engine configuration: frozen dataclasses, built once at the entry point.

Config flows down (entry point → engine → model); derived values are new objects, never mutations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

# Bumped whenever the KV cache layout changes: part of the model fingerprint, so workers with
# incompatible layouts are never paired and stale prefix hashes never match.
KV_LAYOUT_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from an HF ``config.json`` (or GGUF metadata)."""

    architecture: str  # HF architecture name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF ``rope_scaling`` dict (e.g. {"rope_type": "llama3", "factor": 8.0, ...}) or None.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_scaling = cfg.get("rope_scaling")
        # transformers >= 5 folds rope_theta into "rope_parameters".
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=_freeze(rope_scaling),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch.startswith("Qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` equivalent (used to build the HF oracle in tests)."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES.get(self.architecture, "llama"),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        if self.architecture.startswith("Llama") or self.architecture.startswith("Mistral"):
            out["attention_bias"] = self.attention_bias
        return out


_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def _freeze(d: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if d is None:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry. ``num_blocks`` is derived (from memory) unless given."""

    block_size: int = 16
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    # Fraction of free accelerator memory the cache may take (GPU); on CPU a byte budget is used.
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_bytes: int = 1 << 30
    # How the cache is stored (engine/kv_cache/storage.py): "auto" is block-major on a GPU with an
    # attention backend that reads it (a request's blocks then leave for another worker with no
    # gather), else layer-major; "block-major" / "layer-major" force one.
    layout: str = "auto"

    def __post_init__(self) -> None:
        if self.layout not in KV_LAYOUTS:
            raise ValueError(f"CacheConfig.layout {self.layout!r} is not one of {KV_LAYOUTS}")


KV_LAYOUTS = ("auto", "block-major", "layer-major")


@dataclass(frozen=True)
class SchedulerConfig:
    """Step budget: how many tokens (decode + prefill chunks) one forward may process."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    # Longest prefill chunk a single request may contribute in one step (chunked prefill).
    long_prefill_token_threshold: int | None = None
    max_model_len: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    attention_backend: str = "auto"  # "torch" | "triton" | "auto"
    seed: int = 0

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len or self.model.max_position_embeddings

    def with_num_blocks(self, num_blocks: int) -> EngineConfig:
        return replace(self, cache=replace(self.cache, num_blocks=num_blocks))


def model_fingerprint(model: ModelConfig, dtype: torch.dtype, block_size: int, weights_id: str = "") -> str:
    """A stable id of everything that must match for two workers to share KV blocks.

    Seeds the prefix-block hash chain, so blocks computed under a different model, dtype, block size
    or cache layout never collide with ours.
    """
    payload = json.dumps(
        {
            "model": asdict(model),
            "dtype": str(dtype),
            "block_size": block_size,
            "kv_layout": KV_LAYOUT_VERSION,
            "weights": weights_id,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
