"""Prefill worker configuration (frozen; built by the entry point, flows down)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillWorkerConfig:
    worker_id: str = "prefill-0"
    model: str | None = None  # see engine.model_source.resolve_model
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30  # CPU cache budget
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Longest chunk one prompt contributes per step; each finished chunk's blocks ship at once.
    prefill_chunk_tokens: int = 512
    max_model_len: int | None = 4096
    host: str = "127.0.0.1"
    grpc_port: int = 0
    transport: str = "auto"  # gloo (CPU) | nccl (GPU) | loopback (tests) | auto
    secret: str = ""
    default_deadline_s: float = 120.0
