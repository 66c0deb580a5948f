"""The seam between the router's front ends (HTTP, gRPC) and whatever produces tokens.

``ClusterBackend`` (router/cluster_backend.py) drives prefill/decode workers over gRPC; tests use an
in-process fake. Front ends only see this module's types.

Contract of ``GenerationBackend.generate``:
- yields ``TokenEvent``s of ONE sequence (n is handled by the router: one call per choice);
- the first event carries ``num_cached_tokens``, ``route`` (and ``timing`` when measured); the last one
  carries ``finish_reason``;
- never yields more than ``sampling.max_tokens`` tokens in total;
- raises ``BackendError`` on failure (before or during the stream);
- when the consumer stops iterating early, it must call ``abort(request_id)``: closing the iterator
  alone is not guaranteed to reach the workers.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from baton.tracing import SequenceTiming


@dataclass(frozen=True)
class SamplingOptions:
    """Validated sampling knobs, resolved to concrete values (no "absent" left except ``seed``)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False  # the sampled token's logprob
    top_logprobs: int = 0  # this many alternatives per position (implies logprobs)


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str  # of this sequence, unique
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingOptions
    trace_id: str = ""  # the client request it belongs to (sent to workers as x-request-id); "": request_id


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class Route:
    """How a request was placed; ``prefill_worker`` is None when the decode worker prefilled locally."""

    decode_worker: str
    prefill_worker: str | None

    @property
    def decision(self) -> str:
        return "local" if self.prefill_worker is None else "split"


@dataclass(frozen=True)
class TokenEvent:
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # parallel to token_ids when requested, else empty
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # the EOS / stop token that ended the sequence, if any
    num_cached_tokens: int = 0  # prompt tokens served from a prefix cache (first event)
    route: Route | None = None  # first event
    timing: SequenceTiming | None = None  # first event, when the backend measures its phases


@dataclass(frozen=True)
class ModelInfo:
    max_model_len: int
    vocab_size: int | None = None
    model_fingerprint: str = ""


class BackendErrorKind(enum.StrEnum):
    INVALID_ARGUMENT = "invalid_argument"  # the workers rejected the request: never retry
    OVERLOADED = "overloaded"  # no capacity now (429)
    UNAVAILABLE = "unavailable"  # no worker can serve (503)
    TIMEOUT = "timeout"  # a deadline passed (504)
    INTERNAL = "internal"  # a bug or an unexpected worker failure (500)


class BackendError(Exception):
    def __init__(self, kind: BackendErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class GenerationBackend(Protocol):
    @property
    def model_info(self) -> ModelInfo: ...

    def ready(self) -> bool:
        """True when at least one worker (pair) can serve a request now."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]: ...

    async def abort(self, request_id: str) -> None:
        """Cancel on the workers; a no-op for unknown or finished requests. Must not raise."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
