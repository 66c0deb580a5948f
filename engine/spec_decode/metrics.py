"""Speculative decoding counters, named as vLLM names them (``baton:`` prefix).

One verification of one request with ``k >= 1`` draft tokens is a *draft*; ``accepted_per_pos[j]``
counts drafts whose token at position ``j`` (0-based) was accepted. Invariants:
``num_accepted_tokens <= num_draft_tokens``, ``sum(accepted_per_pos) == num_accepted_tokens`` and
``accepted_per_pos`` never increases with ``j`` (a token is accepted only after all before it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PREFIX = "baton:spec_decode_"


@dataclass
class SpecDecodeMetrics:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        if num_draft_tokens <= 0:
            return
        if not 0 <= num_accepted <= num_draft_tokens:
            raise ValueError(f"accepted {num_accepted} of {num_draft_tokens} draft tokens")
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft_tokens:
            self.accepted_per_pos.extend([0] * (num_draft_tokens - len(self.accepted_per_pos)))
        for j in range(num_accepted):
            self.accepted_per_pos[j] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification step yields on average: accepted drafts plus the one sampled token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def snapshot(self) -> dict:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_accepted_tokens_per_pos": list(self.accepted_per_pos),
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
        }

    def prometheus_text(self, labels: dict[str, str] | None = None) -> str:
        """The counters in Prometheus text exposition format (counters get the ``_total`` suffix)."""
        base = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))

        def sample(name: str, value: int, extra: str = "") -> str:
            lab = ",".join(x for x in (base, extra) if x)
            return f"{PREFIX}{name}_total{{{lab}}} {value}" if lab else f"{PREFIX}{name}_total {value}"

        lines = []
        for name, help_text, value in (
            ("num_drafts", "Verifications of draft tokens (one per request per step).", self.num_drafts),
            ("num_draft_tokens", "Draft tokens proposed and verified.", self.num_draft_tokens),
            ("num_accepted_tokens", "Draft tokens accepted.", self.num_accepted_tokens),
        ):
            lines += [
                f"# HELP {PREFIX}{name} {help_text}",
                f"# TYPE {PREFIX}{name} counter",
                sample(name, value),
            ]
        name = "num_accepted_tokens_per_pos"
        lines += [
            f"# HELP {PREFIX}{name} Draft tokens accepted, by position.",
            f"# TYPE {PREFIX}{name} counter",
        ]
        lines += [sample(name, v, f'position="{j}"') for j, v in enumerate(self.accepted_per_pos)]
        return "\n".join(lines) + "\n"
