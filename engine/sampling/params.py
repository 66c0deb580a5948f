"""Per-request sampling parameters (OpenAI / vLLM semantics), validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) => disabled
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # applied to prompt + output tokens (HF semantics)
    presence_penalty: float = 0.0  # applied to output tokens (OpenAI semantics)
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token's + top-k
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, applied on detokenized text
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    ignore_eos: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        def bad(param: str, msg: str) -> ValueError:
            return ValueError(f"{param}: {msg}")

        if self.max_tokens < 1:
            raise bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise bad("top_k", f"must be -1 (disabled) or >= 0, got {self.top_k}")
        if not (0 <= self.min_p <= 1):
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not (0 < self.repetition_penalty <= 2) or not math.isfinite(self.repetition_penalty):
            raise bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-2 <= v <= 2):
                raise bad(name, f"must be in [-2, 2], got {v}")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise bad("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be in [0, max_tokens], got {self.min_tokens}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(
                self, "logit_bias", tuple(sorted((int(k), float(v)) for k, v in self.logit_bias.items()))
            )
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
