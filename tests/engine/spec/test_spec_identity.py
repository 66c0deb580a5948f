"""Greedy decoding with speculation emits exactly the tokens of greedy decoding without it.

Tiny random target; proposers: n-gram lookup, a *different* random draft model (many rejections, so
rollback is exercised) and the target as its own draft (everything accepted). Batch layouts: one
request at a time, all together, a token budget that cuts drafts short, and a KV cache small enough
that drafts are dropped and requests preempted. Block integrity is checked after every step.
"""

from __future__ import annotations

import pytest
import torch

from engine.request import FinishReason
from engine.sampling.params import SamplingParams
from engine.spec_decode import SpecConfig
from tests.engine.helpers import make_engine, random_prompts, run_all
from tests.engine.oracle import TINY_LLAMA
from tests.engine.spec.util import assert_all_blocks_back, spec_engine

VOCAB = TINY_LLAMA["vocab_size"]
LAYOUTS = {
    "one_at_a_time": dict(max_seqs=1),
    "batched": dict(),
    "tight_budget": dict(max_batched=12, chunk=6),  # drafts often do not fit: partial verification
    "few_blocks": dict(num_blocks=36),  # drafts dropped for lack of blocks; preemption
}
PROPOSERS = {
    "ngram": SpecConfig(method="ngram", ngram_min=1, num_speculative_tokens=5, adaptive=False),
    "draft_other": SpecConfig(method="draft", num_speculative_tokens=3, adaptive=False),
    "draft_self": SpecConfig(method="draft", num_speculative_tokens=4, adaptive=False),
    "ngram_adaptive": SpecConfig(method="ngram", ngram_min=1, num_speculative_tokens=6),
}
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def _prompts() -> dict[str, list[int]]:
    prompts = random_prompts(9, VOCAB, 2, 30, seed=3)
    prompts["loop"] = [11, 12, 13, 14] * 6  # n-gram matches from the start
    prompts["long"] = [(5 * i) % 300 + 4 for i in range(70)]
    return prompts


_REF: dict[tuple, dict] = {}


def _reference(weights, layout: str, sampling=GREEDY) -> dict[str, list[int]]:
    key = (layout, sampling)
    if key not in _REF:
        _REF[key] = run_all(make_engine(TINY_LLAMA, weights, **LAYOUTS[layout]), _prompts(), sampling)
    return _REF[key]


def _draft_weights(proposer: str, tiny_target, tiny_draft):
    return tiny_target if proposer == "draft_self" else tiny_draft


CASES = [(p, lay) for p in ("ngram", "draft_other", "draft_self") for lay in LAYOUTS] + [
    ("ngram_adaptive", "batched")
]


@pytest.mark.parametrize("proposer,layout", CASES)
def test_greedy_identical_with_speculation(tiny_target, tiny_draft, proposer, layout):
    eng = spec_engine(
        tiny_target, PROPOSERS[proposer], _draft_weights(proposer, tiny_target, tiny_draft), **LAYOUTS[layout]
    )
    got = run_all(eng, _prompts(), GREEDY)
    assert got == _reference(tiny_target, layout)
    assert_all_blocks_back(eng)
    m = eng.spec.metrics
    assert m.num_drafts > 0 and m.num_draft_tokens > 0, "speculation never ran: the test would prove nothing"
    if proposer == "draft_self":
        assert m.acceptance_rate == 1.0
    if proposer == "draft_other":
        assert m.num_accepted_tokens < m.num_draft_tokens  # rejections (and rollbacks) happened
    if layout == "few_blocks":
        assert eng.metrics.num_preemptions > 0


def test_prefix_cache_never_holds_rejected_drafts(tiny_target, tiny_draft):
    """Every block the speculative engine published holds exactly the KV a plain engine computes for
    that block's tokens (rejected drafts were written into blocks; none of them may be published)."""
    eng = spec_engine(tiny_target, PROPOSERS["draft_other"], tiny_draft)
    prompts = _prompts()
    outs = run_all(eng, prompts, GREEDY)
    ref = make_engine(TINY_LLAMA, tiny_target)
    full = {rid: prompts[rid] + outs[rid] for rid in prompts}
    run_all(ref, full, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    spec_index, ref_index = eng.kv.pool._by_hash, ref.kv.pool._by_hash
    common = [h for h in spec_index if h in ref_index]
    prompt_blocks = sum(len(p) // 4 for p in prompts.values())
    assert len(common) > prompt_blocks, "no output block was published: nothing checked"
    for h in common:
        a = eng.runner.kv_cache[:, :, spec_index[h]]
        b = ref.runner.kv_cache[:, :, ref_index[h]]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert eng.spec.metrics.num_accepted_tokens < eng.spec.metrics.num_draft_tokens


def _stop_cases(ref: dict[str, list[int]]) -> dict[str, int]:
    """Per request, a stop token first seen at output index 2 (inside the first verified run)."""
    return {rid: toks[2] for rid, toks in ref.items() if toks[2] not in toks[:2]}


def test_stop_tokens_max_tokens_and_min_tokens_inside_an_accepted_run(tiny_target):
    """The target as its own draft accepts every draft, so output tokens 1..5 come from one step:
    a stop token at index 2, or max_tokens 3, must cut that run short exactly as plain decoding does."""
    cfg = PROPOSERS["draft_self"]
    ref = _reference(tiny_target, "batched")
    stops = _stop_cases(ref)
    assert len(stops) >= 5
    prompts = {rid: p for rid, p in _prompts().items() if rid in stops}

    sp = {
        rid: SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=(stops[rid],)) for rid in prompts
    }
    eng = spec_engine(tiny_target, cfg, tiny_target)
    reqs = {rid: eng.add_request(rid, p, sp[rid]) for rid, p in prompts.items()}
    emitted = {rid: [] for rid in prompts}
    while eng.has_unfinished():
        for o in eng.step():
            emitted[o.request_id].append(o.new_token_ids)
        eng.check_integrity()
    for rid in prompts:
        assert sum(emitted[rid], ()) == tuple(ref[rid][:3]), rid
        assert reqs[rid].finish_reason == FinishReason.STOP
        assert len(emitted[rid][-1]) >= 2  # the stop came inside a verified run
    # Every request had a fully accepted run of 4 drafts (+1), yet kept 3 tokens: the rest was cut.
    assert eng.spec.metrics.num_accepted_tokens >= 4 * len(prompts)
    assert_all_blocks_back(eng)

    eng = spec_engine(tiny_target, cfg, tiny_target)
    got = run_all(eng, prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert got == {rid: ref[rid][:3] for rid in prompts}
    assert_all_blocks_back(eng)

    # min_tokens masks the stop token in the rows of the run that come before min_tokens.
    sp = {
        rid: SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stops[rid],), min_tokens=4)
        for rid in prompts
    }
    plain = run_all(make_engine(TINY_LLAMA, tiny_target), prompts, sp)
    eng = spec_engine(tiny_target, cfg, tiny_target)
    assert run_all(eng, prompts, sp) == plain
    assert any(len(v) > 3 for v in plain.values())
    assert_all_blocks_back(eng)


@pytest.mark.parametrize("proposer", ["ngram", "draft_other"])
def test_logprobs_and_penalties_match_plain_decoding(tiny_target, tiny_draft, proposer):
    """Logprobs of accepted drafts are those plain decoding reports; repetition/presence penalties see
    the drafts before each row as output (a verification row is scored as its own decode step)."""
    prompts = _prompts()
    sp = SamplingParams(
        max_tokens=24,
        temperature=0.0,
        logprobs=3,
        repetition_penalty=1.2,
        presence_penalty=0.3,
        ignore_eos=True,
    )
    plain = make_engine(TINY_LLAMA, tiny_target)
    spec = spec_engine(tiny_target, PROPOSERS[proposer], tiny_draft)
    for rid, p in prompts.items():
        plain.add_request(rid, p, sp)
        spec.add_request(rid, p, sp)
    reqs_plain = dict(plain.requests)
    reqs_spec = dict(spec.requests)
    while plain.has_unfinished():
        plain.step()
    while spec.has_unfinished():
        spec.step()
    for rid in prompts:
        a, b = reqs_plain[rid], reqs_spec[rid]
        assert a.output_token_ids == b.output_token_ids, rid
        for (lp_a, top_a), (lp_b, top_b) in zip(a.output_logprobs, b.output_logprobs, strict=True):
            assert lp_b == pytest.approx(lp_a, abs=1e-4)
            assert [t for t, _ in top_b] == [t for t, _ in top_a]
            assert [v for _, v in top_b] == pytest.approx([v for _, v in top_a], abs=1e-4)
    assert spec.spec.metrics.num_accepted_tokens > 0
    assert_all_blocks_back(spec)


def test_abort_mid_speculation_frees_everything(tiny_target, tiny_draft):
    eng = spec_engine(tiny_target, PROPOSERS["draft_other"], tiny_draft)
    for rid, p in _prompts().items():
        eng.add_request(rid, p, GREEDY)
    for _ in range(4):
        eng.step()
    assert any(r.spec_token_ids == [] for r in eng.requests.values())
    for rid in list(eng.requests):
        eng.abort(rid)
    assert not eng.has_unfinished()
    assert_all_blocks_back(eng)


def test_metrics_invariants_and_exposition(tiny_target, tiny_draft):
    eng = spec_engine(tiny_target, PROPOSERS["draft_other"], tiny_draft)
    run_all(eng, _prompts(), GREEDY)
    m = eng.spec.metrics
    per_pos = m.accepted_per_pos
    assert sum(per_pos) == m.num_accepted_tokens <= m.num_draft_tokens
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:], strict=False))
    assert eng.spec_stats["num_drafts"] == m.num_drafts
    text = m.prometheus_text({"model_name": "tiny"})
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos"):
        assert f"# TYPE baton:spec_decode_{name} counter" in text
    assert (
        f'baton:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",position="0"}} {per_pos[0]}'
        in text
    )


def test_draft_catches_up_in_chunks_and_survives_a_full_draft_cache(tiny_target, tiny_draft):
    """A request whose prompt the draft has not seen is caught up at most ``draft_catch_up_tokens``
    per step (decoding plainly meanwhile); a request that finds no room in the draft's KV cache
    decodes without drafts. Output stays identical either way, and no block leaks on either side."""
    from engine.spec_decode import build_spec_decoder

    cfg = SpecConfig(method="draft", num_speculative_tokens=3, adaptive=False, draft_catch_up_tokens=8)
    for draft_blocks in (256, 10):
        eng = make_engine(TINY_LLAMA, tiny_target)
        draft = make_engine(TINY_LLAMA, tiny_target, num_blocks=draft_blocks, prefix=False)
        eng.set_spec(build_spec_decoder(eng, cfg, draft_engine=draft))
        assert run_all(eng, _prompts(), GREEDY) == _reference(tiny_target, "batched")
        assert eng.spec.metrics.num_drafts > 0
        assert_all_blocks_back(eng)
