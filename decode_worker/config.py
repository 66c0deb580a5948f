"""Decode worker configuration (frozen; built by the entry point, flows down)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeWorkerConfig:
    worker_id: str = "decode-0"
    model: str | None = None  # see engine.model_source.resolve_model
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30  # CPU cache budget
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    # Local prefill (short uncached suffix, or no prefill worker) is chunked to keep decodes smooth.
    prefill_chunk_tokens: int = 256
    max_model_len: int | None = 4096
    # Reservations waiting for KV are bounded: beyond this, Reserve answers RESOURCE_EXHAUSTED.
    max_reservations: int = 64
    # Blocks kept free for running decodes when admitting a reservation (avoids instant preemption).
    reserve_headroom_blocks: int = 4
    host: str = "127.0.0.1"
    grpc_port: int = 0
    kv_port: int = 0
    transport: str = "auto"  # gloo (CPU) | nccl (GPU) | loopback (tests) | auto
    secret: str = ""
    reservation_timeout_s: float = 60.0
    # Speculative decoding (engine/spec_decode): None (off) | "ngram" | "draft". The draft model (same
    # vocabulary; None: the target model itself) is prefilled here when a request's KV lands.
    speculative: str | None = None
    draft_model: str | None = None
    draft_seed: int | None = None  # weights seed of a dummy draft model (None: the target's seed)
    num_speculative_tokens: int = 8  # most draft tokens per request per step (the policy picks fewer)
    adaptive_speculation: bool = True  # False: always the most draft tokens (tests, measurements)
