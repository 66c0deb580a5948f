"""Verification of draft tokens against the target model's distributions.

Two rules, both exact (the emitted tokens follow the target distribution):

* **Exact match** (``match_drafts``) for *point* proposals (n-gram lookup, greedy drafts, or drafts
  drawn with the request's own noise): the target token of every row is chosen exactly as the
  non-speculative sampler would choose it (argmax for greedy; for sampling, the exponential race with
  the request's next noise vector, one vector per emitted token), and drafts are accepted while they
  equal it. For a point proposal ``q = onehot(d)`` this accepts with probability ``p(d)`` and otherwise
  yields a sample of ``p`` restricted to ``!= d``: the Leviathan rule below with ``q`` one-hot. It also
  makes the emitted tokens *identical* to non-speculative decoding with the same seed, whatever the
  number of drafts or the batch.
* **Rejection sampling** (``RejectionSampler``; Leviathan et al. 2023, Chen et al. 2023) for drafts
  sampled from a draft distribution ``q``: accept draft ``d_j`` with probability ``min(1, p_j(d)/q_j(d))``;
  at the first rejection emit a sample of ``normalize(max(0, p_j - q_j))`` and stop; when every draft is
  accepted emit a bonus token sampled from ``p_k``.

Row ``j`` of the target's distributions is the one that follows the known tokens plus drafts ``d_1..d_j``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def match_drafts(target_token: Callable[[int], int], drafts: Sequence[int]) -> list[int]:
    """Exact-match verification. ``target_token(j)`` chooses the target's token of row ``j``; it is
    called only for rows whose token is emitted (rows ``0..a``), so a sampler's noise is consumed once
    per emitted token. Returns the emitted tokens: accepted drafts, then the first differing target
    token (or the bonus token of row ``len(drafts)``)."""
    out: list[int] = []
    for j, d in enumerate(drafts):
        t = target_token(j)
        out.append(t)
        if t != d:
            return out
    out.append(target_token(len(drafts)))
    return out


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw of ``probs`` ([V], need not be normalised) by the exponential race, on the CPU."""
    noise = torch.empty(probs.shape[-1]).exponential_(generator=generator)
    return int((probs.detach().float().cpu() / noise).argmax())


class RejectionSampler:
    """The Leviathan/Chen rule. Subclasses may override the two rule methods (tests do, to check that
    a wrong rule is caught by the distribution test)."""

    def accept_probability(self, p: torch.Tensor, q: torch.Tensor, token: int) -> float:
        """Probability of keeping draft ``token`` drawn from ``q`` when the target says ``p``."""
        qd = float(q[token])
        return 1.0 if qd <= 0.0 else min(1.0, float(p[token]) / qd)

    def recovery_distribution(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """What to sample from after a rejection: ``normalize(max(0, p - q))``. If ``p == q`` up to
        rounding (a rejection had probability ~0), ``p`` itself."""
        r = (p - q).clamp_min(0.0)
        total = float(r.sum())
        return r / total if total > 1e-12 else p

    def __call__(
        self,
        target_probs: torch.Tensor,  # [k + 1, V]
        drafts: Sequence[int],  # k tokens
        draft_probs: torch.Tensor,  # [k, V], row j is the distribution d_{j+1} was drawn from
        generator: torch.Generator,
    ) -> list[int]:
        k = len(drafts)
        if target_probs.shape[0] != k + 1 or draft_probs.shape[0] != k:
            raise ValueError(f"{k} drafts need {k + 1} target rows and {k} draft rows")
        p_all = target_probs.detach().float().cpu()
        q_all = draft_probs.detach().float().cpu()
        out: list[int] = []
        for j, d in enumerate(drafts):
            p, q = p_all[j], q_all[j]
            u = float(torch.rand(1, generator=generator))
            if u < self.accept_probability(p, q, d):
                out.append(int(d))
                continue
            out.append(sample_from(self.recovery_distribution(p, q), generator))
            return out
        out.append(sample_from(p_all[k], generator))
        return out
