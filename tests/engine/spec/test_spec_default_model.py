"""Speculative decoding on the real default model (SmolLM2-135M-Instruct), CPU.

Greedy with the n-gram proposer and with the model as its own draft is token-identical to greedy
without speculation; a model drafting for itself accepts (nearly) every token; stop strings cut an
accepted run at the same place as without speculation.
"""

from __future__ import annotations

import pytest

from engine.llm import LLM
from engine.sampling.params import SamplingParams
from engine.spec_decode import SpecConfig, build_spec_decoder, load_draft_engine
from tests.engine.spec.util import assert_all_blocks_back

TEXT = (
    "The committee met on Tuesday to discuss the new library budget. Members agreed that the library "
    "needs longer opening hours, more computers and a quiet room for students. The budget will be "
    "voted on next month, after the comittee has heard from the public."
)
CONVERSATIONS = [
    f"Rewrite the following text, fixing typos:\n\n{TEXT}",
    "What is the capital of France?",
    f"Repeat this sentence exactly: {TEXT[:90]}",
]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", max_num_batched_tokens=1024)


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.render_chat([{"role": "user", "content": c}]) for c in CONVERSATIONS]


@pytest.fixture(scope="module")
def reference(llm, prompts):
    llm.engine.set_spec(None)
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


def _with_spec(llm, config: SpecConfig, draft_engine=None):
    llm.engine.set_spec(build_spec_decoder(llm.engine, config, draft_engine=draft_engine))
    return llm.engine.spec


def test_ngram_greedy_identical(llm, prompts, reference):
    spec = _with_spec(llm, SpecConfig(method="ngram", num_speculative_tokens=8))
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == reference
        assert [o.token_ids for o in llm.generate(prompts[:1], GREEDY)] == reference[:1]  # batch of one
        m = spec.metrics
        assert m.num_accepted_tokens > 0.3 * m.num_draft_tokens  # copying text: most drafts pass
        assert_all_blocks_back(llm.engine)
    finally:
        llm.engine.set_spec(None)


def test_own_draft_accepts_nearly_everything(llm, prompts, reference):
    draft = load_draft_engine(llm.engine, SpecConfig(method="draft", draft_model=None, draft_num_blocks=256))
    spec = _with_spec(llm, SpecConfig(method="draft", num_speculative_tokens=4, adaptive=False), draft)
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == reference
        m = spec.metrics
        assert m.num_draft_tokens >= 40
        assert m.acceptance_rate >= 0.95, m.snapshot()
        assert_all_blocks_back(llm.engine)
    finally:
        llm.engine.set_spec(None)


def test_stop_string_inside_an_accepted_run(llm):
    sp = SamplingParams(max_tokens=40, temperature=0.0, stop=("opening",))
    conv = [{"role": "user", "content": CONVERSATIONS[0]}]
    llm.engine.set_spec(None)
    plain = llm.chat(conv, sp)[0]
    _with_spec(llm, SpecConfig(method="ngram", num_speculative_tokens=8, adaptive=False))
    try:
        spec = llm.chat(conv, sp)[0]
    finally:
        llm.engine.set_spec(None)
    assert plain.finish_reason == "stop" and "opening" not in plain.text
    assert (spec.text, spec.token_ids, spec.finish_reason) == (
        plain.text,
        plain.token_ids,
        plain.finish_reason,
    )
