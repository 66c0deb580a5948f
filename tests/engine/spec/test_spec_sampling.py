"""Sampling with speculation: the emitted distribution is the target's.

* Exact-match verification (n-gram drafts, or any seeded request) emits *the same tokens* as plain
  seeded sampling: the strongest form of "same distribution", and reproducible whatever the batch.
* Rejection sampling (unseeded requests with a draft model) is checked statistically: a chi-square
  test of the joint distribution of three sampled tokens against the target model's exact one.
  The same test must reject deliberately broken acceptance rules, or it would prove nothing.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from engine.sampling.params import SamplingParams
from engine.spec_decode import RejectionSampler, SpecConfig
from tests.engine.helpers import make_engine, random_prompts, run_all
from tests.engine.oracle import TINY_LLAMA, hf_model, hf_weights
from tests.engine.spec.util import assert_all_blocks_back, spec_engine

VOCAB = TINY_LLAMA["vocab_size"]


def _seeded(n: int) -> dict[str, SamplingParams]:
    return {
        f"r{i}": SamplingParams(
            max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=100 + i, ignore_eos=True
        )
        for i in range(n)
    }


@pytest.mark.parametrize(
    "config",
    [
        SpecConfig(method="ngram", ngram_min=1, num_speculative_tokens=5, adaptive=False),
        SpecConfig(method="draft", num_speculative_tokens=3, adaptive=False),
    ],
    ids=["ngram", "draft"],
)
def test_seeded_sampling_is_identical_to_plain_seeded_sampling(tiny_target, tiny_draft, config):
    prompts = random_prompts(8, VOCAB, 3, 30, seed=5)
    prompts["r7"] = [11, 12, 13] * 6
    sp = _seeded(len(prompts))
    plain = run_all(make_engine(TINY_LLAMA, tiny_target), prompts, sp)
    eng = spec_engine(tiny_target, config, tiny_draft)
    assert run_all(eng, prompts, sp) == plain
    assert eng.spec.metrics.num_accepted_tokens > 0
    assert_all_blocks_back(eng)
    # One request alone, with a different k: still the same tokens (batch- and k-independent).
    eng = spec_engine(
        tiny_target,
        SpecConfig(method=config.method, num_speculative_tokens=2, adaptive=False),
        tiny_draft,
        max_seqs=1,
    )
    assert run_all(eng, {"r3": prompts["r3"]}, {"r3": sp["r3"]})["r3"] == plain["r3"]


def test_unseeded_rejection_sampling_is_reproducible_per_engine_seed(tiny_target, tiny_draft):
    prompts = random_prompts(6, VOCAB, 3, 20, seed=6)
    # A high temperature makes the two random models' distributions overlap: some drafts pass.
    sp = SamplingParams(max_tokens=20, temperature=4.0, ignore_eos=True)
    cfg = SpecConfig(method="draft", num_speculative_tokens=3, adaptive=False)
    first = run_all(spec_engine(tiny_target, cfg, tiny_draft), prompts, sp)
    eng = spec_engine(tiny_target, cfg, tiny_draft)
    assert run_all(eng, prompts, sp) == first
    m = eng.spec.metrics
    assert 0 < m.num_accepted_tokens < m.num_draft_tokens
    assert_all_blocks_back(eng)


# --- the distribution test ------------------------------------------------------------------------
SMALL = dict(TINY_LLAMA, vocab_size=6, eos_token_id=5, bos_token_id=4)
PROMPT = [0, 3, 1]
TEMPERATURE = 3.0  # flattens the random models' sharp distributions so every cell gets samples
NUM_SAMPLES = 2000


class AlwaysAccept(RejectionSampler):
    """Broken: keeps every draft token (emits the draft's distribution)."""

    def accept_probability(self, p, q, token):
        return 1.0


class ResampleFromTarget(RejectionSampler):
    """Broken: after a rejection samples p instead of the residual max(0, p - q)."""

    def recovery_distribution(self, p, q):
        return p


@torch.inference_mode()
def _exact_joint(model) -> dict[tuple[int, int, int], float]:
    """P(t1, t2, t3 | PROMPT) of the target at TEMPERATURE, from HF forwards."""

    def probs(prefixes: list[list[int]]) -> torch.Tensor:
        logits = model(torch.tensor([PROMPT + p for p in prefixes])).logits[:, -1].float()
        return torch.softmax(logits / TEMPERATURE, dim=-1)

    v = SMALL["vocab_size"]
    p1 = probs([[]])[0]
    p2 = probs([[a] for a in range(v)])
    pairs = list(itertools.product(range(v), repeat=2))
    p3 = probs([list(ab) for ab in pairs])
    return {(a, b, c): float(p1[a] * p2[a, b] * p3[i, c]) for i, (a, b) in enumerate(pairs) for c in range(v)}


@pytest.fixture(scope="module")
def small_models():
    target = hf_model(SMALL, seed=0)
    draft = hf_model(SMALL, seed=1)
    return target, hf_weights(target), hf_weights(draft)


def _chi_square_p_value(small_models, rejection: RejectionSampler) -> float:
    from engine.spec_decode import build_spec_decoder

    target, tw, dw = small_models
    cfg = SpecConfig(method="draft", num_speculative_tokens=2, adaptive=False, draft_catch_up_tokens=1 << 20)
    eng = make_engine(SMALL, tw, num_blocks=4096, max_batched=4096, max_seqs=1024)
    draft = make_engine(SMALL, dw, num_blocks=4096, prefix=False)
    eng.set_spec(build_spec_decoder(eng, cfg, draft_engine=draft, rejection=rejection))
    # Token 1 comes from the prompt's step; tokens 2 and 3 from verifying 2 drafts (a 4th token may
    # come with them: max_tokens leaves room for the bonus token, which is not tested).
    sp = SamplingParams(max_tokens=4, temperature=TEMPERATURE, ignore_eos=True)
    outs = run_all(eng, {f"s{i}": PROMPT for i in range(NUM_SAMPLES)}, sp, check_every_step=False)
    assert_all_blocks_back(eng)
    m = eng.spec.metrics
    assert m.num_drafts >= NUM_SAMPLES and m.accepted_per_pos[0] >= NUM_SAMPLES // 4  # every sample verified
    expected = _exact_joint(target)
    counts = dict.fromkeys(expected, 0)
    for toks in outs.values():
        counts[tuple(toks[:3])] += 1
    # Cells expected fewer than 5 times are pooled (the chi-square approximation needs it).
    big = [c for c in expected if expected[c] * NUM_SAMPLES >= 5]
    small = [c for c in expected if c not in big]
    obs = [counts[c] for c in big] + [sum(counts[c] for c in small)]
    exp = [expected[c] * NUM_SAMPLES for c in big] + [sum(expected[c] for c in small) * NUM_SAMPLES]
    exp = [e * sum(obs) / sum(exp) for e in exp]  # exact probabilities sum to 1 up to rounding
    return float(chisquare(obs, exp).pvalue)


@pytest.mark.parametrize(
    "rule,correct",
    [(RejectionSampler(), True), (AlwaysAccept(), False), (ResampleFromTarget(), False)],
    ids=["leviathan", "broken_always_accept", "broken_resample_from_target"],
)
def test_rejection_sampling_matches_target_distribution(small_models, rule, correct):
    p = _chi_square_p_value(small_models, rule)
    if correct:
        assert p > 1e-3, f"correct rule rejected: p = {p:.2e}"
    else:
        assert p < 1e-6, f"broken rule not caught: p = {p:.2e}"
