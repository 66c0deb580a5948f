"""Conversions between ``baton.v1`` messages and engine types, shared by both workers.

Everything received is validated here: a malformed message becomes ``ValueError`` with the field
name, which the services map to ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import math
import time

from baton.v1 import common_pb2, worker_pb2
from engine.engine import RequestOutput
from engine.host import EngineStats, KVEventBatch
from engine.metrics import HistogramSnapshot
from engine.request import FinishReason
from engine.sampling.params import SamplingParams

MAX_TOP_LOGPROBS = 20

_FINISH = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}


def sampling_from_proto(msg: common_pb2.SamplingParams, max_tokens_limit: int, vocab_size: int) -> SamplingParams:
    """Proto -> engine params. Absent max_tokens means 'until the context limit'."""
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else max_tokens_limit
    if max_tokens > max_tokens_limit:
        max_tokens = max_tokens_limit
    if msg.top_logprobs < 0 or msg.top_logprobs > MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs: must be in [0, {MAX_TOP_LOGPROBS}], got {msg.top_logprobs}")
    bad_ids = [t for t in list(msg.stop_token_ids) + list(msg.logit_bias) if not 0 <= t < vocab_size]
    if bad_ids:
        raise ValueError(f"token ids {bad_ids[:4]} are outside the vocabulary [0, {vocab_size})")
    if any(not math.isfinite(v) for v in msg.logit_bias.values()):
        raise ValueError("logit_bias: values must be finite")
    logprobs = msg.top_logprobs if (msg.logprobs or msg.top_logprobs) else None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k if msg.top_k > 0 else -1,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        logit_bias=tuple(sorted((int(k), float(v)) for k, v in msg.logit_bias.items())),
        logprobs=logprobs,
        stop_token_ids=tuple(msg.stop_token_ids),
        min_tokens=min(msg.min_tokens, max_tokens),
        ignore_eos=msg.ignore_eos,
    )


def check_token_ids(ids, vocab_size: int, field: str) -> list[int]:
    ids = list(ids)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{field}: token ids {bad[:4]} are outside the vocabulary [0, {vocab_size})")
    return ids


def logprob_to_proto(token_id: int, lp) -> tuple[common_pb2.TokenLogprob | None, common_pb2.TopLogprobs | None]:
    """Engine logprobs ``(logprob, [(id, lp), ...])`` -> proto pair (None when not requested)."""
    if lp is None:
        return None, None
    sampled, top = lp
    top_msg = common_pb2.TopLogprobs(entries=[common_pb2.TokenLogprob(token_id=i, logprob=v) for i, v in top])
    return common_pb2.TokenLogprob(token_id=token_id, logprob=sampled), top_msg


def logprob_from_proto(first: common_pb2.TokenLogprob | None, top: common_pb2.TopLogprobs | None):
    if first is None:
        return None
    return (first.logprob, [(e.token_id, e.logprob) for e in top.entries] if top is not None else [])


def chunk_from_output(out: RequestOutput, with_logprobs: bool, with_top: bool) -> common_pb2.TokenChunk:
    chunk = common_pb2.TokenChunk(token_ids=list(out.new_token_ids))
    if with_logprobs:
        for tok, lp in zip(out.new_token_ids, out.new_logprobs, strict=True):
            first, top = logprob_to_proto(tok, lp)
            if first is not None:
                chunk.logprobs.append(first)
                if with_top:
                    chunk.top_logprobs.append(top)
    if out.finished and out.finish_reason is not None:
        chunk.finish_reason = _FINISH[out.finish_reason]
    return chunk


def histogram_to_proto(h: HistogramSnapshot) -> common_pb2.Histogram:
    return common_pb2.Histogram(upper_bounds=h.upper_bounds, bucket_counts=h.bucket_counts, sum=h.sum, count=h.count)


def stats_to_proto(s: EngineStats) -> common_pb2.WorkerStats:
    return common_pb2.WorkerStats(
        num_running=s.num_running, num_waiting=s.num_waiting, num_total_blocks=s.num_total_blocks,
        num_free_blocks=s.num_free_blocks, kv_cache_usage=s.kv_cache_usage,
        prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
        num_preemptions=s.num_preemptions, num_finished_requests=s.num_finished_requests,
        num_generated_tokens=s.num_generated_tokens, num_prompt_tokens=s.num_prompt_tokens,
        kv_transfer_failures=s.kv_transfer.failures, kv_transfer_bytes=s.kv_transfer.bytes,
        kv_transfer_time_seconds=histogram_to_proto(s.kv_transfer.time),
        request_queue_time_seconds=histogram_to_proto(s.queue_time),
        spec_decode_num_drafts=s.spec_decode.num_drafts, spec_decode_num_draft_tokens=s.spec_decode.num_draft_tokens,
        spec_decode_num_accepted_tokens=s.spec_decode.num_accepted_tokens,
        spec_decode_num_accepted_tokens_per_pos=list(s.spec_decode.num_accepted_tokens_per_pos),
    )


def kv_event_to_proto(batch: KVEventBatch, worker_id: str, fingerprint: str) -> common_pb2.KVEvent:
    ev = common_pb2.KVEvent(
        worker_id=worker_id, stored_block_hashes=list(batch.stored), removed_block_hashes=list(batch.removed),
        sequence=batch.sequence, model_fingerprint=fingerprint, timestamp_ms=int(batch.timestamp * 1000),
    )
    if batch.parent is not None:
        ev.parent_block_hash = batch.parent
    return ev


def error(code: int, message: str, retryable: bool = False) -> common_pb2.Error:
    return common_pb2.Error(code=code, message=message, retryable=retryable)


# --- shared by both workers' services -------------------------------------------------------
def worker_info(worker, role: int, address: str, kv_address: str) -> common_pb2.WorkerInfo:
    s = worker.host.stats()
    lay = worker.layout
    return common_pb2.WorkerInfo(
        worker_id=worker.worker_id, role=role, address=address, model_fingerprint=worker.fingerprint,
        block_size=lay.block_size, num_total_blocks=s.num_total_blocks, num_free_blocks=s.num_free_blocks,
        num_running=s.num_running, num_waiting=s.num_waiting, model_name=worker.source.name,
        max_model_len=worker.engine.max_model_len, kv_transfer_address=kv_address,
        kv_layout=common_pb2.KVLayout(num_layers=lay.num_layers, block_size=lay.block_size, num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, dtype=lay.dtype),
        timestamp_ms=int(time.time() * 1000), stats=stats_to_proto(s),
    )


def health_response(worker) -> common_pb2.HealthCheckResponse:
    if not worker.healthy():
        return common_pb2.HealthCheckResponse(status=common_pb2.SERVING_STATUS_NOT_SERVING, message="engine loop stopped")
    if worker.draining:
        return common_pb2.HealthCheckResponse(status=common_pb2.SERVING_STATUS_DRAINING)
    return common_pb2.HealthCheckResponse(status=common_pb2.SERVING_STATUS_SERVING)


def kv_events_response(worker, after: int) -> worker_pb2.KVEventsResponse:
    batches = worker.host.events_after(after)
    events = [kv_event_to_proto(b, worker.worker_id, worker.fingerprint) for b in batches]
    return worker_pb2.KVEventsResponse(events=events, oldest_sequence=batches[0].sequence if batches else after + 1)


