"""Sampler semantics, and seeded sampling that does not depend on batch composition."""

from __future__ import annotations

import math

import pytest
import torch

from engine.request import Request
from engine.sampling.params import SamplingParams
from engine.sampling.sampler import Sampler
from tests.engine.helpers import make_engine, random_prompts, run_all
from tests.engine.oracle import TINY_LLAMA, hf_model, hf_weights


def _req(sp: SamplingParams, prompt=(1, 2, 3), out=(), eos=(2,)) -> Request:
    r = Request("r", list(prompt), sp, eos_token_ids=eos)
    r.output_token_ids = list(out)
    return r


def test_greedy_takes_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    assert Sampler()(logits, [_req(SamplingParams(temperature=0))]).token_ids == [1]


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    reqs = [_req(SamplingParams(temperature=1.0, top_k=1, seed=i)) for i in range(2)]
    reqs += [_req(SamplingParams(temperature=1.0, top_p=1e-6, seed=i)) for i in range(2)]
    assert Sampler()(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_min_p_removes_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {Sampler()(logits, [_req(SamplingParams(temperature=1.0, min_p=0.2, seed=s))]).token_ids[0] for s in range(300)}
    assert seen == {0, 1, 2}  # 0.05 < 0.2 * 0.5 is filtered; 0.15 >= 0.1 survives


def test_sampling_follows_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None]
    counts = torch.zeros(3)
    for s in range(3000):
        counts[Sampler()(logits, [_req(SamplingParams(temperature=1.0, seed=s))]).token_ids[0]] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)


def test_penalties_and_bias():
    logits = torch.tensor([[2.0, 2.0, -1.0, 0.5]])
    # repetition penalty divides positive / multiplies negative logits of seen tokens (prompt 0, output 2).
    r = _req(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=(0,), out=(2,))
    out = Sampler()._process(logits, [r])
    assert out.tolist() == [[1.0, 2.0, -2.0, 0.5]]
    r = _req(SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5), prompt=(1,), out=(0, 0))
    assert Sampler()._process(logits, [r]).tolist() == [[2.0 - 1.0 - 1.0, 2.0, -1.0, 0.5]]
    r = _req(SamplingParams(temperature=0, logit_bias={3: 10.0}))
    assert Sampler()(logits, [r]).token_ids == [3]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]])
    r = _req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,)), eos=(2,))
    assert Sampler()(logits, [r]).token_ids == [4]
    r.output_token_ids = [4, 4]
    assert Sampler()(logits, [r]).token_ids == [2]


def test_logprobs_are_of_raw_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = Sampler()(logits, [_req(SamplingParams(temperature=0, logprobs=2, logit_bias={0: 100.0}))])
    lp = torch.log_softmax(logits, -1)[0]
    assert out.token_ids == [0]
    sampled, top = out.logprobs[0]
    assert math.isclose(sampled, lp[0].item(), rel_tol=1e-6)
    assert [t for t, _ in top] == [2, 1]


@pytest.mark.parametrize(
    "kwargs,param",
    [({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"), ({"top_p": 0}, "top_p"),
     ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 3}, "presence_penalty"),
     ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 21}, "logprobs")],
)
def test_bad_params_raise_with_name(kwargs, param):
    with pytest.raises(ValueError, match=param):
        SamplingParams(**kwargs)


def test_seeded_sampling_reproducible_and_batch_independent():
    model = hf_model(TINY_LLAMA)
    weights = hf_weights(model)
    prompts = random_prompts(8, TINY_LLAMA["vocab_size"], 5, 40, seed=4)
    sp = {rid: SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, ignore_eos=True)
          for i, rid in enumerate(prompts)}
    alone = {}
    for rid, p in prompts.items():
        alone.update(run_all(make_engine(TINY_LLAMA, weights), {rid: p}, {rid: sp[rid]}))
    together = run_all(make_engine(TINY_LLAMA, weights, max_batched=24, chunk=8), prompts, sp)
    assert together == alone
    again = run_all(make_engine(TINY_LLAMA, weights, max_batched=24, chunk=8), prompts, sp)
    assert again == together
    assert len({tuple(v) for v in together.values()}) > 1
