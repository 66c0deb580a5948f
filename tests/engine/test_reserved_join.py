"""A request whose KV arrived from a prefill worker joins the batch after a lookahead step in flight.

The lookahead itself runs only with CUDA graphs (tests/engine/test_gpu_engine.py checks it is used,
not dropped, when a request joins); here the runner reports one pending so the engine's bookkeeping
around it can be checked on CPU: when the request joins, what it is told, and that an abort or a
first token that ends it leave every block accounted for.
"""

from __future__ import annotations

import pytest

from engine.engine import RequestOutput
from engine.request import FinishReason
from engine.sampling.params import SamplingParams
from tests.engine.helpers import make_engine, random_prompts
from tests.engine.oracle import TINY_LLAMA, hf_model, hf_weights

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def weights():
    return hf_weights(hf_model(TINY_LLAMA))


@pytest.fixture
def engine(weights):
    eng = make_engine(TINY_LLAMA, weights, block_size=4, num_blocks=64)
    scheduled: list[list[str]] = []
    execute = eng.runner.execute

    def recording_execute(batch, lookahead=False):
        scheduled.append([s.request.request_id for s in batch.requests])
        return execute(batch, lookahead=lookahead)

    eng.runner.execute = recording_execute
    eng.scheduled = scheduled
    return eng


def _prompts():
    return list(random_prompts(2, TINY_LLAMA["vocab_size"], 9, 14, seed=5).values())


def _start_with_lookahead_pending(eng, monkeypatch, req, first_token: int):
    monkeypatch.setattr(eng.runner, "lookahead_pending", lambda: True)
    out = eng.start_reserved(req, first_token)
    monkeypatch.undo()
    return out


def test_request_joins_after_the_step_in_flight(engine, monkeypatch) -> None:
    busy, joiner = _prompts()
    engine.add_request("busy", busy, GREEDY)
    engine.step()  # busy's prefill: it decodes from now on
    req = engine.reserve("joiner", joiner, GREEDY)
    assert _start_with_lookahead_pending(engine, monkeypatch, req, first_token=7) is None
    assert engine.has_unfinished()

    outs = engine.step()  # the step in flight: the batch as it was
    assert engine.scheduled[-1] == ["busy"]
    joined = [o for o in outs if o.request_id == "joiner"]
    assert joined == [RequestOutput("joiner", (), (), False, None, len(joiner), 0)]

    outs = engine.step()  # the next one decodes it
    assert engine.scheduled[-1] == ["busy", "joiner"]
    assert [len(o.new_token_ids) for o in outs if o.request_id == "joiner"] == [1]
    while engine.has_unfinished():
        engine.step()
        engine.check_integrity()
    assert req.output_token_ids[0] == 7 and len(req.output_token_ids) == GREEDY.max_tokens
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_request_alone_joins_on_the_next_step_call(engine, monkeypatch) -> None:
    _, joiner = _prompts()
    req = engine.reserve("joiner", joiner, GREEDY)
    assert _start_with_lookahead_pending(engine, monkeypatch, req, first_token=7) is None
    assert engine.has_unfinished()  # the engine loop keeps stepping for it
    assert engine.step() == [RequestOutput("joiner", (), (), False, None, len(joiner), 0)]
    assert engine.scheduled == []
    engine.step()
    assert engine.scheduled == [["joiner"]]


def test_abort_while_joining_frees_its_blocks(engine, monkeypatch) -> None:
    busy, joiner = _prompts()
    engine.add_request("busy", busy, GREEDY)
    engine.step()
    req = engine.reserve("joiner", joiner, GREEDY)
    _start_with_lookahead_pending(engine, monkeypatch, req, first_token=7)
    engine.abort("joiner")
    engine.check_integrity()
    while engine.has_unfinished():
        assert all(o.request_id != "joiner" for o in engine.step())
        engine.check_integrity()
    assert all("joiner" not in batch for batch in engine.scheduled)
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_first_token_that_ends_the_request_does_not_wait(engine, monkeypatch) -> None:
    busy, joiner = _prompts()
    engine.add_request("busy", busy, GREEDY)
    engine.step()
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    req = engine.reserve("joiner", joiner, one)
    out = _start_with_lookahead_pending(engine, monkeypatch, req, first_token=7)
    assert out == RequestOutput("joiner", (), (), True, FinishReason.LENGTH, len(joiner), 0)
    engine.check_integrity()
    while engine.has_unfinished():
        engine.step()
    assert all("joiner" not in batch for batch in engine.scheduled)
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
