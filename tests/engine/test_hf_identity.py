"""Greedy decoding is token-identical to HF transformers (fp32, same weights), logits within 1e-4,
under chunked prefill, prefix-cache hits, forced preemption and mixed batches."""

from __future__ import annotations

import pytest
import torch

from engine.sampling.params import SamplingParams
from tests.engine.helpers import make_engine, random_prompts, run_all
from tests.engine.oracle import TINY_LLAMA, TINY_QWEN2, hf_greedy, hf_model, hf_weights

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
CONFIGS = {"llama3": TINY_LLAMA, "qwen2": TINY_QWEN2}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def oracle(request):
    cfg = CONFIGS[request.param]
    model = hf_model(cfg)
    return cfg, model, hf_weights(model)


def _check(model, prompts, outs, sampler=None, n_new=24):
    for rid, p in prompts.items():
        ref_tokens, ref_logits = hf_greedy(model, p, n_new)
        assert outs[rid] == ref_tokens, f"{rid}: tokens differ"
        if sampler is not None:
            got = sampler.logits[rid]
            # Rows after a preemption are recomputed; compare the last len(ref) rows (one per token).
            for step, (a, b) in enumerate(zip(got[-len(ref_logits):], ref_logits, strict=True)):
                diff = (a - b).abs().max().item()
                assert diff < 1e-4, f"{rid} step {step}: logits differ by {diff}"


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_matches_hf(oracle, chunk):
    cfg, model, weights = oracle
    prompts = random_prompts(4, cfg["vocab_size"], 3, 70, seed=chunk)
    eng = make_engine(cfg, weights, chunk=chunk, max_batched=max(chunk, 8) * 2, record=True)
    outs = run_all(eng, prompts, GREEDY)
    _check(model, prompts, outs, eng.runner.sampler)


def test_prefix_cache_hits_match_hf(oracle):
    cfg, model, weights = oracle
    eng = make_engine(cfg, weights, block_size=4, record=True)
    base = random_prompts(1, cfg["vocab_size"], 37, 37, seed=1)["r0"]
    first = {"a": base}
    run_all(eng, first, GREEDY)
    second = {"b": base + [5, 6, 7, 8, 9], "c": base[:21] + [11, 12]}
    eng.add_request("b", second["b"], GREEDY)
    eng.add_request("c", second["c"], GREEDY)
    cached = {}
    outs = {"b": [], "c": []}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id].extend(o.new_token_ids)
            cached[o.request_id] = o.num_cached_tokens
    eng.check_integrity()
    assert cached["b"] == 36 and cached["c"] == 20, cached  # whole blocks, never the last prompt token
    _check(model, second, outs, eng.runner.sampler)


def test_forced_preemption_matches_hf(oracle):
    cfg, model, weights = oracle
    prompts = random_prompts(6, cfg["vocab_size"], 10, 30, seed=3)
    # 40 blocks of 4 tokens cannot hold 6 sequences of up to 54 tokens: preemption must happen.
    eng = make_engine(cfg, weights, block_size=4, num_blocks=40, max_batched=32)
    reqs = {}
    for rid, p in prompts.items():
        reqs[rid] = eng.add_request(rid, p, GREEDY)
    outs = {rid: [] for rid in prompts}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id].extend(o.new_token_ids)
        eng.check_integrity()
    assert sum(r.num_preemptions for r in reqs.values()) > 0
    _check(model, prompts, outs)


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_mixed_batches_match_hf(oracle, batch):
    cfg, model, weights = oracle
    prompts = random_prompts(batch, cfg["vocab_size"], 1, 50, seed=batch)
    eng = make_engine(cfg, weights, block_size=16, num_blocks=512, max_batched=96, chunk=32)
    outs = run_all(eng, prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), check_every_step=False)
    _check(model, prompts, outs, n_new=12)


def test_prefill_logits_match_hf_over_whole_prompt(oracle):
    """Every position of a long prompt (not only the last) matches HF's forward, chunked in 7s."""
    cfg, model, weights = oracle
    eng = make_engine(cfg, weights, chunk=7)
    prompt = random_prompts(1, cfg["vocab_size"], 45, 45, seed=9)["r0"]
    req = eng.add_request("x", prompt, GREEDY)
    hidden_rows = []
    orig = eng.runner.model.forward

    def spy(*a, **k):
        h = orig(*a, **k)
        hidden_rows.append(h.clone())
        return h

    eng.runner.model.forward = spy
    while req.num_computed_tokens < len(prompt):
        eng.step()
    ours = eng.runner.model.compute_logits(torch.cat(hidden_rows)[: len(prompt)])
    with torch.inference_mode():
        ref = model(torch.tensor([prompt])).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-4
    eng.abort("x")
    eng.check_integrity()
