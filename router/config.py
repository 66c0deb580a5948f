"""Router configuration: one frozen dataclass built at the entry point and passed down."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    """Limits and identity of one router replica.

    ``max_model_len`` of None means "what the backend reports" (``GenerationBackend.model_info``).
    """

    served_model_name: str
    max_model_len: int | None = None
    max_n: int = 16  # choices per request (n), and prompts x n for batched completions
    max_logprobs: int = 20  # top_logprobs / completions logprobs upper bound
    max_stop_strings: int = 16
    max_body_bytes: int = 16 * 1024 * 1024
    default_max_tokens: int | None = None  # None: up to the context limit
    request_timeout_s: float = 600.0  # whole-request deadline; the stream errors out after it
    otlp_endpoint: str = ""  # export request traces as OpenTelemetry spans here (BATON_OTLP_ENDPOINT)
    version: str = "0.1.0"

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must be set")
        for name in ("max_n", "max_body_bytes", "max_stop_strings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be >= 0")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
