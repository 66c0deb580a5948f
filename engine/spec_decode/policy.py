"""How many draft tokens each request gets this step (adaptive speculation).

Per request, the acceptance rate ``a`` (chance that a draft token is accepted given the ones before it
were) is estimated from its own recent verifications, starting from the rate pooled over all requests;
the ``j``-th draft token then adds ``a**j`` expected tokens. A step's cost is modelled as

    cost = c0 + c_seq * sequences + c_tok * extra_tokens + c_verify * verifying_sequences

where ``extra_tokens`` are the tokens beyond one per sequence (draft tokens; prefill chunks are
counted alike when planning) and ``verifying_sequences`` those with drafts (each runs its own
multi-row attention). The model is fitted online (ridge regression towards a prior, with forgetting)
to the measured times of decode/verification steps. Separating the per-sequence cost matters: on a
CPU a decode step of 64 sequences is dominated by per-sequence work (attention over each context),
while a draft token only adds a row to the matmuls, so speculation still pays at 64 when drafts are
good. A draft model adds ``d0`` per draft forward plus ``d1`` per drafted row.

The plan maximises expected tokens per second of the step: starting from no drafts, it adds the draft
tokens with the best gain/cost ratio while each addition raises ``expected_tokens / step_cost``. A
request's first drafts come as one bundle (sized for its best ratio) because ``c_verify`` is paid
once. When the step is compute bound (large batches on a GPU, or poor drafts) a draft token costs
more than it is expected to yield and speculation switches itself off.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

POOLED_DECAY = 0.98  # the workload-wide acceptance estimate forgets slower than a request's own


@dataclass(frozen=True)
class PolicyConfig:
    max_k: int = 8  # most draft tokens per request per step
    adaptive: bool = True  # False: every request gets ``max_k`` (capped by what is proposed)
    prior_acceptance: float = 0.6
    prior_weight: float = 2.0  # pseudo-observations behind the prior acceptance
    decay: float = 0.85  # weight of a request's history per new verification
    # Cost model prior, in any unit (only ratios matter until measurements come in): fixed, per
    # sequence, per extra token, per verifying sequence (relative values measured on a 2-core CPU).
    step_cost_prior: tuple[float, float, float, float] = (1.0, 0.1, 0.025, 0.075)
    draft_cost_prior: tuple[float, float] = (0.5, 0.02)  # per draft forward, per drafted row
    measure: bool = True  # fit the cost model to measured step times
    forget: float = 0.97  # weight of older measurements per new one
    max_batch: int | None = None  # hard switch: no speculation above this many running requests


class Acceptance:
    """Decayed count estimate of one request's per-position acceptance rate."""

    __slots__ = ("accepted", "tried")

    def __init__(self, prior: float, weight: float) -> None:
        self.accepted, self.tried = prior * weight, weight

    def update(self, num_drafts: int, num_accepted: int, decay: float) -> None:
        tried = num_accepted + (1 if num_accepted < num_drafts else 0)  # positions that were tested
        self.accepted = decay * self.accepted + num_accepted
        self.tried = decay * self.tried + tried

    @property
    def rate(self) -> float:
        return min(0.99, max(0.0, self.accepted / self.tried))


class LinearCost:
    """``cost(x) = w . x``, fitted by ridge regression towards a prior with exponential forgetting.

    Observing is cheap (a rank-one update); the fit is solved only when ``w`` is read, since steps are
    observed far more often than drafts are planned (every decode step, speculating or not)."""

    def __init__(self, prior: tuple[float, ...], scale: tuple[float, ...], forget: float) -> None:
        self.prior = np.asarray(prior, dtype=np.float64)
        # One pseudo-observation per feature at its typical magnitude keeps the fit near the prior
        # where data is missing (e.g. no verification step measured yet).
        self._p = np.diag(np.asarray(scale, dtype=np.float64) ** 2)
        self._a = np.zeros_like(self._p)
        self._b = np.zeros(len(prior))
        self.forget = forget
        self.num_observations = 0
        self._w = self.prior.copy()  # the fit as of the last solve
        self._unsolved = 0  # observations since that solve

    @property
    def w(self) -> np.ndarray:
        if self._unsolved:
            w = np.linalg.solve(self._p + self._a, self._p @ self.prior + self._b)
            self._w = np.maximum(w, self.prior * 1e-3)  # costs are positive
            self._unsolved = 0
        return self._w

    def observe(self, x: tuple[float, ...], seconds: float) -> None:
        v = np.asarray(x, dtype=np.float64)
        if self.num_observations >= 8:  # one stalled step (a busy machine) must not swing the fit
            # A fit at most 8 observations old is close enough for a clamp.
            predicted = float((self.w if self._unsolved >= 8 else self._w) @ v)
            if predicted > 0:
                seconds = min(max(seconds, predicted / 3), predicted * 3)
        self._a = self.forget * self._a + np.outer(v, v)
        self._b = self.forget * self._b + v * seconds
        self.num_observations += 1
        if self.num_observations == 1:
            # First real measurement: rescale the prior so it speaks the measured unit (seconds).
            self.rescale(seconds / float(self.prior @ v))
        self._unsolved += 1

    def rescale(self, factor: float) -> None:
        """Change the prior's unit (e.g. to seconds, once one measurement tells the ratio)."""
        self.prior = self.prior * factor
        if self.num_observations == 0:
            self._w = self.prior.copy()

    def __call__(self, *x: float) -> float:
        return float(self.w @ np.asarray(x, dtype=np.float64))


class AdaptivePolicy:
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.step_cost = LinearCost(config.step_cost_prior, (1.0, 32.0, 64.0, 8.0), config.forget)
        self.draft_cost = LinearCost(config.draft_cost_prior, (1.0, 8.0), config.forget)
        self._acceptance: dict[str, Acceptance] = {}
        # All requests together: the prior of a request without history of its own (empirical Bayes),
        # so a workload of good drafts lets new requests speculate from their first decode step.
        self._pooled = Acceptance(config.prior_acceptance, config.prior_weight)

    # --- per-request acceptance ----------------------------------------------------------------
    def acceptance(self, request_id: str) -> float:
        a = self._acceptance.get(request_id)
        return a.rate if a is not None else self._pooled.rate

    def record(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        if num_drafts <= 0:
            return
        a = self._acceptance.get(request_id)
        if a is None:  # a new request starts from what this workload's drafts have been doing
            a = self._acceptance[request_id] = Acceptance(self._pooled.rate, self.config.prior_weight)
        a.update(num_drafts, num_accepted, self.config.decay)
        self._pooled.update(num_drafts, num_accepted, POOLED_DECAY)

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)

    # --- measurements --------------------------------------------------------------------------
    def observe_step(self, num_seqs: int, num_tokens: int, num_verifying: int, seconds: float) -> None:
        """A decode/verification step's measured time (every sequence emitted tokens)."""
        if not self.config.measure:
            return
        x = (1.0, float(num_seqs), float(num_tokens - num_seqs), float(num_verifying))
        if self.step_cost.num_observations == 0 and self.draft_cost.num_observations == 0:
            # The draft prior is relative to the step prior: move both to seconds together.
            self.draft_cost.rescale(seconds / self.step_cost(*x))
        self.step_cost.observe(x, seconds)

    def observe_draft(self, num_rows: int, seconds: float) -> None:
        if self.config.measure:
            self.draft_cost.observe((1.0, float(num_rows)), seconds)

    # --- the plan ------------------------------------------------------------------------------
    def plan(
        self,
        request_ids: list[str],
        available: list[int],
        *,
        num_seqs: int,
        base_tokens: int,
        num_sampling: int,
        token_budget: int,
        uses_draft_model: bool,
    ) -> list[int]:
        """Draft tokens per request (``<= available[i]``, in total ``<= token_budget``).

        ``num_seqs`` / ``base_tokens``: sequences and tokens the step computes without drafts;
        ``num_sampling``: requests that emit a token this step without drafts (the baseline gain)."""
        cfg = self.config
        caps = [max(0, min(a, cfg.max_k)) for a in available]
        if not cfg.adaptive:
            return _fit_budget(caps, token_budget)
        if cfg.max_batch is not None and num_sampling > cfg.max_batch:
            return [0] * len(caps)
        _, _, c_tok, c2 = self.step_cost.w
        d0, d1 = self.draft_cost.w if uses_draft_model else (0.0, 0.0)
        per_token = c_tok + d1
        gain = float(max(num_sampling, 1))
        cost = self.step_cost(1.0, float(num_seqs), float(max(0, base_tokens - num_seqs)), 0.0)
        ks = [0] * len(caps)
        rates = [self.acceptance(r) for r in request_ids]
        heap: list[tuple[float, int, int]] = []  # (-gain/cost, request index, tokens to add)
        for i, cap in enumerate(caps):
            if cap > 0 and rates[i] > 0:
                m, ratio = _best_opening(rates[i], cap, per_token, c2 + d0)
                heapq.heappush(heap, (-ratio, i, m))
        drafted_steps = 0  # draft forwards needed so far (the longest draft)
        budget = token_budget
        while heap and budget > 0:
            _, i, m = heapq.heappop(heap)
            m, k, a = min(m, budget), ks[i], rates[i]
            g = sum(a**j for j in range(k + 1, k + m + 1))
            dc = m * per_token + (c2 if k == 0 else 0.0) + d0 * max(0, k + m - drafted_steps)
            if (gain + g) * cost <= gain * (cost + dc):
                continue  # would lower tokens per second; this request gets no (more) drafts
            ks[i] = k + m
            gain, cost, budget = gain + g, cost + dc, budget - m
            drafted_steps = max(drafted_steps, ks[i])
            if ks[i] < caps[i]:
                heapq.heappush(heap, (-(a ** (ks[i] + 1)) / per_token, i, 1))
        return ks


def _best_opening(rate: float, cap: int, per_token: float, per_seq: float) -> tuple[int, float]:
    """The first-drafts bundle size with the best expected-gain / cost ratio, and that ratio."""
    best_m, best_ratio, g = 1, -1.0, 0.0
    for m in range(1, cap + 1):
        g += rate**m
        ratio = g / (m * per_token + per_seq)
        if ratio > best_ratio:
            best_m, best_ratio = m, ratio
    return best_m, best_ratio


def _fit_budget(caps: list[int], budget: int) -> list[int]:
    out = []
    for c in caps:
        take = min(c, max(0, budget))
        out.append(take)
        budget -= take
    return out
