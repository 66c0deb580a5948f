"""The worker actor: a prefill or decode worker plus its gRPC server, as one plain class.

Ray wraps it in one line (``ray.remote(...)(WorkerActor)``); tests may use it directly. Only lifecycle
calls with primitive arguments go through Ray; requests, tokens and KV never do (gRPC and the KV
transport carry them).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # "prefill" | "decode"
    worker_id: str
    model: str | None
    secret: str
    dtype: str = "auto"
    host: str = "127.0.0.1"
    grpc_port: int = 0
    kv_port: int = 0
    block_size: int = 16
    max_model_len: int | None = 4096
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    gpu_memory_utilization: float = 0.9
    transport: str = "auto"
    seed: int = 0
    metrics_port: int | None = None  # Prometheus /metrics of this worker: None off, 0 a free port
    speculative: str | None = None  # decode only: None | "ngram" | "draft" (decode_worker.config)
    draft_model: str | None = None  # decode only, with speculative="draft"; None: the target model
    num_speculative_tokens: int = 8
    prefill_chunk_tokens: int | None = None  # longest prefill chunk per step (None: the worker default)


class WorkerActor:
    def __init__(self, spec: WorkerSpec) -> None:
        for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ.setdefault(var, value)  # NVLink multicast off: it can take a shared host's GPUs down
        self.spec = spec
        self.incarnation = uuid.uuid4().hex[:12]  # changes when Ray restarts the actor
        self.started_at = time.time()
        common = dict(
            worker_id=spec.worker_id, model=spec.model, dtype=spec.dtype, host=spec.host, grpc_port=spec.grpc_port,
            block_size=spec.block_size, max_model_len=spec.max_model_len, max_num_seqs=spec.max_num_seqs,
            num_kv_blocks=spec.num_kv_blocks, kv_cache_bytes=spec.kv_cache_bytes,
            gpu_memory_utilization=spec.gpu_memory_utilization, transport=spec.transport, secret=spec.secret, seed=spec.seed,
        )
        if spec.max_num_batched_tokens:
            common["max_num_batched_tokens"] = spec.max_num_batched_tokens
        if spec.prefill_chunk_tokens:
            common["prefill_chunk_tokens"] = spec.prefill_chunk_tokens
            # A step must fit the chunk, or a long prompt could never run unchunked.
            common["max_num_batched_tokens"] = max(common.get("max_num_batched_tokens", 0), spec.prefill_chunk_tokens)
        if spec.role == "prefill":
            from prefill_worker.config import PrefillWorkerConfig
            from prefill_worker.service import serve
            from prefill_worker.worker import PrefillWorker

            self.worker = PrefillWorker(PrefillWorkerConfig(**common))
        elif spec.role == "decode":
            from decode_worker.config import DecodeWorkerConfig
            from decode_worker.service import serve
            from decode_worker.worker import DecodeWorker

            spec_opts = dict(speculative=spec.speculative, draft_model=spec.draft_model, num_speculative_tokens=spec.num_speculative_tokens)
            self.worker = DecodeWorker(DecodeWorkerConfig(**common, kv_port=spec.kv_port, **spec_opts))
        else:
            raise ValueError(f"unknown worker role {spec.role!r}")
        self.server, self.address = serve(self.worker, spec.host, spec.grpc_port, spec.secret)
        self.metrics = None
        if spec.metrics_port is not None:
            from baton.convert import worker_info
            from baton.v1 import common_pb2
            from baton.worker_metrics import serve_worker_metrics

            role = common_pb2.WORKER_ROLE_PREFILL if spec.role == "prefill" else common_pb2.WORKER_ROLE_DECODE
            kv_address = getattr(self.worker, "kv_address", "")
            snapshot = lambda: worker_info(self.worker, role, self.address, kv_address)  # noqa: E731
            self.metrics = serve_worker_metrics(snapshot, spec.host, spec.metrics_port)

    def ready(self) -> dict:
        """Identity of this incarnation (plain values only)."""
        w = self.worker
        return {
            "worker_id": w.worker_id,
            "role": self.spec.role,
            "address": self.address,
            "kv_address": getattr(w, "kv_address", ""),
            "metrics_address": self.metrics.address if self.metrics is not None else "",
            "fingerprint": w.fingerprint,
            "model_name": w.source.name,
            "tokenizer_dir": w.source.tokenizer_dir or "",
            "max_model_len": w.engine.max_model_len,
            "block_size": w.layout.block_size,
            "vocab_size": w.vocab_size,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
        }

    def ping(self) -> str:
        if not self.worker.healthy():
            raise RuntimeError("engine loop stopped")
        return self.incarnation

    def pid(self) -> int:
        return os.getpid()

    def drain(self) -> dict:
        """Stop taking new requests; report what is still in flight."""
        self.worker.draining = True
        s = self.worker.host.stats()
        return {"running": s.num_running, "waiting": s.num_waiting, "pending": len(getattr(self.worker, "transfers", None).jobs) if hasattr(self.worker, "transfers") else len(self.worker.reservations.by_id)}

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.server.stop(grace=1).wait()
        self.worker.close()
