"""Conversions between ``baton.v1`` protobuf messages and the router's domain types.

Messages received from the network are validated here (``ValueError`` on anything malformed), so the
rest of the router only sees well-formed frozen dataclasses.
"""

from __future__ import annotations

from baton.v1 import common_pb2
from router.backend import FinishReason, SamplingOptions, TokenEvent, TokenLogprob
from router.placement.base import KVEventBatch, WorkerRecord, WorkerRole

_ROLES = {
    common_pb2.WORKER_ROLE_PREFILL: WorkerRole.PREFILL,
    common_pb2.WORKER_ROLE_DECODE: WorkerRole.DECODE,
}
_FINISH = {
    common_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    common_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
}


def sampling_to_proto(s: SamplingOptions) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        max_tokens=s.max_tokens,
        min_tokens=s.min_tokens,
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        logit_bias=dict(s.logit_bias),
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
        n=1,
    )
    if s.seed is not None:
        msg.seed = s.seed
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams, default_max_tokens: int) -> SamplingOptions:
    """Absent fields take the documented defaults; ranges are checked by the caller's validation."""
    return SamplingOptions(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k or -1,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        min_tokens=msg.min_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        logprobs=msg.logprobs or msg.top_logprobs > 0,
        top_logprobs=msg.top_logprobs,
    )


def token_logprobs(
    logprobs: list[common_pb2.TokenLogprob], top: list[common_pb2.TopLogprobs], n_tokens: int
) -> tuple[TokenLogprob, ...]:
    if not logprobs:
        return ()
    if len(logprobs) != n_tokens or (top and len(top) != n_tokens):
        raise ValueError("logprobs are not parallel to token_ids")
    out = []
    for i, lp in enumerate(logprobs):
        alternatives = tuple((e.token_id, e.logprob) for e in top[i].entries) if top else ()
        out.append(TokenLogprob(lp.logprob, alternatives))
    return tuple(out)


def event_from_chunk(chunk: common_pb2.TokenChunk, num_cached_tokens: int = 0) -> TokenEvent:
    ids = tuple(chunk.token_ids)
    finish = None
    if chunk.HasField("finish_reason"):
        if chunk.finish_reason not in _FINISH:
            raise ValueError(f"unexpected finish reason {chunk.finish_reason}")
        finish = _FINISH[chunk.finish_reason]
    return TokenEvent(
        token_ids=ids,
        logprobs=token_logprobs(list(chunk.logprobs), list(chunk.top_logprobs), len(ids)),
        finish_reason=finish,
        stop_token_id=chunk.stop_token_id if chunk.HasField("stop_token_id") else None,
        num_cached_tokens=num_cached_tokens,
    )


def record_from_proto(info: common_pb2.WorkerInfo) -> WorkerRecord:
    if info.role not in _ROLES:
        raise ValueError(f"worker {info.worker_id!r} has no valid role")
    return WorkerRecord(
        worker_id=info.worker_id,
        role=_ROLES[info.role],
        address=info.address,
        model_fingerprint=info.model_fingerprint,
        block_size=info.block_size,
        num_total_blocks=info.num_total_blocks,
        num_free_blocks=info.num_free_blocks,
        num_running=info.num_running,
        num_waiting=info.num_waiting,
        model_name=info.model_name,
        max_model_len=info.max_model_len,
        kv_transfer_address=info.kv_transfer_address,
    )


def event_from_proto(event: common_pb2.KVEvent) -> KVEventBatch:
    return KVEventBatch(
        worker_id=event.worker_id,
        sequence=event.sequence,
        stored_block_hashes=tuple(event.stored_block_hashes),
        removed_block_hashes=tuple(event.removed_block_hashes),
        all_blocks_cleared=event.all_blocks_cleared,
        model_fingerprint=event.model_fingerprint,
        parent_block_hash=event.parent_block_hash if event.HasField("parent_block_hash") else None,
    )
