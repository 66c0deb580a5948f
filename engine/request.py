"""The request and its one state machine.

    WAITING ──▶ RUNNING ──▶ FINISHED            (aggregated, or decode side after KV landed)
    WAITING ──▶ RUNNING ──▶ SENDING_KV ──▶ FINISHED     (prefill worker)
    WAITING_FOR_KV ──▶ RUNNING ──▶ FINISHED     (decode worker: blocks reserved, KV arriving)
    RUNNING ──▶ PREEMPTED ──▶ RUNNING           (blocks reclaimed; recomputed later)
    any ──▶ ABORTED

``transition()`` is the only way to change state; an illegal transition is a bug and raises.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    SENDING_KV = "sending_kv"
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED)


_ALLOWED: dict[RequestStatus, set[RequestStatus]] = {
    RequestStatus.WAITING: {RequestStatus.RUNNING},
    RequestStatus.WAITING_FOR_KV: {RequestStatus.RUNNING},
    RequestStatus.RUNNING: {RequestStatus.FINISHED, RequestStatus.PREEMPTED, RequestStatus.SENDING_KV},
    RequestStatus.PREEMPTED: {RequestStatus.RUNNING, RequestStatus.FINISHED},
    RequestStatus.SENDING_KV: {RequestStatus.FINISHED},
    RequestStatus.FINISHED: set(),
    RequestStatus.ABORTED: set(),
}


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


@dataclass(eq=False)  # a request is equal only to itself (queues test membership by identity)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(
        default_factory=list
    )  # per output token: (logprob, [(id, lp), ...]) or None
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of the prompt, served from the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of full blocks of known tokens, in order
    num_registered_blocks: int = 0  # leading blocks published to (or taken from) the prefix cache
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Generator for seeded sampling; created lazily by the sampler so each request's draws are its own.
    generator: object | None = None
    # Draft tokens proposed for this step (speculative decoding). They follow the known tokens, are
    # verified by the step that computes them, and never count as known: ``num_tokens`` excludes them.
    spec_token_ids: list[int] = field(default_factory=list)

    def transition(self, new: RequestStatus) -> None:
        if new == RequestStatus.ABORTED and not self.status.is_finished:
            self.status = new
            return
        if new not in _ALLOWED[self.status]:
            raise RuntimeError(
                f"request {self.request_id}: illegal transition {self.status.name} -> {new.name}"
            )
        self.status = new

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.spec_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
