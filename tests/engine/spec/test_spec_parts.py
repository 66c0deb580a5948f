"""Unit tests of the speculative-decoding parts: n-gram lookup, verification rules, policy, cost model."""

from __future__ import annotations

import pytest
import torch

from engine.request import Request
from engine.sampling.params import SamplingParams
from engine.spec_decode import AdaptivePolicy, NgramProposer, PolicyConfig, RejectionSampler
from engine.spec_decode.policy import Acceptance, LinearCost
from engine.spec_decode.rejection import match_drafts


def _req(tokens: list[int], rid: str = "r") -> Request:
    return Request(rid, list(tokens), SamplingParams())


# --- n-gram ---------------------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_earlier_occurrence():
    p = NgramProposer(min_n=2, max_n=3)
    r = _req([1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 7, 8, 1, 2])
    # suffix (1, 2) last seen before at positions 7-8, followed by 3, 7, 8, 1, 2
    assert p.propose(r, 4) == [3, 7, 8, 1]
    r.output_token_ids += [3, 7]  # longer suffix (2, 3, 7) now matches at positions 8-10
    assert p.propose(r, 3) == [8, 1, 2]


def test_ngram_copy_overlaps_itself_and_misses_cleanly():
    p = NgramProposer(min_n=2, max_n=4)
    assert p.propose(_req([5, 6, 7, 5, 6, 7, 5, 6]), 7) == [7, 5, 6, 7, 5, 6, 7]  # period-3 loop
    assert p.propose(_req([1, 2, 3, 4, 5], "other"), 4) == []  # no repeated bigram
    assert p.propose(_req([1, 2], "short"), 3) == []
    p.forget("other")
    assert len(p) == 2


def _ngram_by_search(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The n-gram rule by brute force: longest suffix (max_n..min_n) with an earlier occurrence; copy
    what followed its latest one, the copy running into itself."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for end in range(length - 2, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == suffix:
                out: list[int] = []
                for i in range(k):
                    pos = end + 1 + i
                    out.append(tokens[pos] if pos < length else out[pos - length])
                return out
    return []


def test_ngram_index_matches_brute_force_search_as_tokens_arrive():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        vocab = 3 + trial % 5  # small vocabularies repeat n-grams often
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen)
        r = _req(prompt.tolist(), f"t{trial}")
        p = NgramProposer(min_n=1 + trial % 2, max_n=4)
        for _ in range(25):
            k = 1 + int(torch.randint(0, 6, (1,), generator=gen))
            assert p.propose(r, k) == _ngram_by_search(r.all_token_ids, k, p.min_n, p.max_n)
            step = int(torch.randint(1, 4, (1,), generator=gen))  # several tokens between lookups
            r.output_token_ids += torch.randint(0, vocab, (step,), generator=gen).tolist()


# --- verification rules ---------------------------------------------------------------------------
def test_match_drafts_consumes_one_target_choice_per_emitted_token():
    calls = []

    def target(j: int) -> int:
        calls.append(j)
        return [4, 5, 9, 1][j]

    assert match_drafts(target, [4, 5, 6]) == [4, 5, 9]
    assert calls == [0, 1, 2]
    assert match_drafts(lambda j: [4, 5, 6, 8][j], [4, 5, 6]) == [4, 5, 6, 8]  # all accepted + bonus


def test_rejection_rule_pieces():
    rs = RejectionSampler()
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    assert rs.accept_probability(p, q, 0) == 1.0
    assert rs.accept_probability(p, q, 1) == pytest.approx(0.5)
    torch.testing.assert_close(rs.recovery_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(rs.recovery_distribution(p, p), p)  # nothing to recover: p itself
    # Draft distribution equal to the target's: every draft is accepted, then one bonus token.
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 10), dim=-1)
    assert rs(probs, [3, 1, 7], probs[:3], gen)[:3] == [3, 1, 7]


# --- policy ---------------------------------------------------------------------------------------
# Step costs (ms) as measured on the 2-core CPU with the default model: fixed, per sequence, per extra
# token, per verifying sequence; and a compute-bound card at large batch (a token costs like a row).
CPU_LIKE = PolicyConfig(max_k=8, step_cost_prior=(40.0, 3.9, 0.9, 3.0), measure=False)
COMPUTE_BOUND = PolicyConfig(max_k=8, step_cost_prior=(1.0, 0.02, 0.02, 0.01), measure=False)


def _plan(
    config: PolicyConfig, batch: int, rate: float | None = None, available: int = 8, budget: int = 4096
):
    policy = AdaptivePolicy(config)
    ids = [f"r{i}" for i in range(batch)]
    if rate is not None:
        for rid in ids:  # a long history at this per-position acceptance rate
            policy._acceptance[rid] = Acceptance(rate, weight=1e6)
    return policy.plan(
        ids,
        [available] * batch,
        num_seqs=batch,
        base_tokens=batch,
        num_sampling=batch,
        token_budget=budget,
        uses_draft_model=False,
    )


def test_policy_speculates_deep_at_batch_one():
    assert _plan(CPU_LIKE, 1, rate=0.9) == [8]
    assert _plan(CPU_LIKE, 1, rate=0.0) == [0]


def test_policy_at_large_batch_depends_on_what_a_draft_token_costs():
    # CPU: per-sequence work dominates a 64-sequence step, so good drafts still pay; poor ones do not.
    plan = _plan(CPU_LIKE, 64, rate=0.8)
    assert 0 < min(plan) and max(plan) < 8  # fewer than at batch 1: the step is dearer
    assert sum(_plan(CPU_LIKE, 64, rate=0.8, budget=100)) <= 100  # the step's token budget holds
    assert _plan(CPU_LIKE, 64, rate=0.3) == [0] * 64
    # Compute bound: a draft token costs as much as a sequence's row; speculation switches off.
    assert _plan(COMPUTE_BOUND, 256, rate=0.8) == [0] * 256


def test_policy_follows_acceptance_rate_and_budget():
    assert sum(_plan(CPU_LIKE, 8, rate=0.95)) > sum(_plan(CPU_LIKE, 8, rate=0.5))
    assert sum(_plan(CPU_LIKE, 2, rate=0.95, budget=5)) <= 5
    fixed = AdaptivePolicy(PolicyConfig(max_k=4, adaptive=False))
    plan = dict(num_seqs=2, base_tokens=2, num_sampling=2, token_budget=100, uses_draft_model=True)
    assert fixed.plan(["a", "b"], [9, 2], **plan) == [4, 2]
    capped = AdaptivePolicy(PolicyConfig(max_k=4, max_batch=2, step_cost_prior=(40.0, 3.9, 0.9, 3.0)))
    plan = dict(num_seqs=3, base_tokens=3, num_sampling=3, token_budget=100, uses_draft_model=False)
    assert capped.plan(["a", "b", "c"], [4] * 3, **plan) == [0, 0, 0]


def test_acceptance_estimate_counts_tested_positions():
    a = Acceptance(0.6, weight=2.0)
    for _ in range(30):
        a.update(4, 1, decay=0.9)  # one accepted, then one rejected: rate 1/2
    assert a.rate == pytest.approx(0.5, abs=0.02)
    for _ in range(30):
        a.update(4, 4, decay=0.9)  # all four accepted (no rejection tested)
    assert a.rate > 0.95


def test_cost_model_learns_measured_costs():
    cost = LinearCost((1.0, 0.1, 0.025, 0.075), (1.0, 32.0, 64.0, 8.0), forget=0.99)
    true = (0.04, 0.004, 0.001, 0.003)
    shapes = [
        (1, 0, 0),
        (64, 0, 0),
        (8, 40, 5),
        (17, 0, 0),
        (33, 100, 12),
        (2, 8, 1),
        (48, 300, 20),
        (1, 8, 1),
    ]
    for seqs, extra, verifying in shapes * 10:
        cost.observe(
            (1.0, seqs, extra, verifying), true[0] + true[1] * seqs + true[2] * extra + true[3] * verifying
        )
    assert cost.w == pytest.approx(true, rel=0.1)
