"""ModelRunner: turns a ScheduledBatch into tensors, runs the model, samples. Returns a StepOutput.

It owns the model, the KV cache tensor and the attention backend, and nothing about policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.models.llama import LlamaForCausalLM
from engine.request import Request
from engine.sampling.sampler import Logprobs, Sampler
from engine.scheduler import ScheduledBatch


@dataclass(frozen=True)
class StepOutput:
    """Tokens sampled this step, keyed by request id (only requests whose step reached the end)."""

    sampled: dict[str, int]
    logprobs: dict[str, Logprobs | None]


@dataclass(frozen=True)
class BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # rows of the flattened step whose logits are sampled
    sampled_requests: tuple[Request, ...]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        attn: AttentionBackend,
        block_size: int,
        sampler: Sampler,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache  # [L, 2, num_blocks, block_size, Hkv, D]
        self.attn = attn
        self.block_size = block_size
        self.sampler = sampler
        self.device = kv_cache.device

    def prepare(self, batch: ScheduledBatch) -> BatchInputs:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qstart = [0]
        seq_lens: list[int] = []
        rows: list[int] = []
        sampled: list[Request] = []
        for s in batch.requests:
            r, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            tokens = r.all_token_ids
            ids.extend(tokens[start : start + n])
            p = range(start, start + n)
            pos.extend(p)
            slots.extend(r.block_ids[i // bs] * bs + i % bs for i in p)
            qstart.append(qstart[-1] + n)
            seq_lens.append(start + n)
            if s.samples:
                rows.append(qstart[-1] - 1)
                sampled.append(r)
        max_blocks = max(-(-sl // bs) for sl in seq_lens)
        table = [
            s.request.block_ids[:max_blocks] + [0] * (max_blocks - len(s.request.block_ids[:max_blocks]))
            for s in batch.requests
        ]
        dev = self.device

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        query_lens = tuple(s.num_new_tokens for s in batch.requests)
        meta = AttentionMetadata(
            query_start_loc=t(qstart, torch.int32),
            seq_lens=t(seq_lens, torch.int32),
            block_tables=t(table, torch.int32),
            slot_mapping=t(slots, torch.int64),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=tuple(seq_lens),
        )
        return BatchInputs(t(ids, torch.long), t(pos, torch.long), meta, t(rows, torch.long), tuple(sampled))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta, self.attn)
        if not inputs.sampled_requests:
            return StepOutput({}, {})
        logits = self.model.compute_logits(hidden[inputs.logits_rows])
        out = self.sampler(logits, list(inputs.sampled_requests))
        ids = [r.request_id for r in inputs.sampled_requests]
        return StepOutput(
            dict(zip(ids, out.token_ids, strict=True)), dict(zip(ids, out.logprobs, strict=True))
        )
