"""Disaggregated P -> D (separate processes, gloo) is token-identical to the aggregated engine."""

from __future__ import annotations

import pytest

from baton.pd_driver import PDDriver
from baton.v1 import common_pb2
from engine.llm import LLM
from engine.sampling.params import SamplingParams
from tests.workers.cluster import SECRET, WorkerProcess

# Prompt lengths around block (4) and chunk (7) boundaries, plus a long one.
LENGTHS = [1, 3, 4, 5, 7, 8, 13, 16, 17, 28, 29, 64]


@pytest.fixture(scope="module", params=["dummy:tiny-llama", "dummy:tiny-qwen2", "default"])
def pair(request):
    model = request.param
    common = ["--block-size", "4", "--num-kv-blocks", "512"]
    d = WorkerProcess("decode", model, *common, "--chunk", "16")
    p = WorkerProcess("prefill", model, *common, "--chunk", "7")
    llm = LLM(None if model == "default" else model, block_size=4, num_kv_blocks=512)
    yield model, p, d, llm
    p.stop()
    d.stop()


def _prompts(llm, model):
    if model == "default":
        convs = ["What is the capital of France?", "Write a short poem about rain and the city at night, please."]
        return [llm.render_chat([{"role": "user", "content": c}]) for c in convs]
    return [[(7 * i + n) % 300 + 5 for i in range(n)] for n in LENGTHS]


def test_disaggregated_matches_aggregated(pair):
    model, p, d, llm = pair
    drv = PDDriver(p.address, d.address, SECRET)
    sp_proto = common_pb2.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = _prompts(llm, model)
    ref = [o.token_ids for o in llm.generate(prompts, sp)]
    for i, prompt in enumerate(prompts):
        cold = drv.run(f"{model}-cold-{i}", prompt, sp_proto)
        assert cold.error is None, cold.error
        assert cold.token_ids == ref[i], f"prompt length {len(prompt)}"
        # Same prompt again: prefix-cache hits on P (and on D, so fewer blocks move).
        warm = drv.run(f"{model}-warm-{i}", prompt, sp_proto)
        assert warm.error is None and warm.token_ids == ref[i]
        if len(prompt) > 4:
            assert warm.num_cached_tokens_prefill > 0 or warm.num_transferred_blocks < cold.num_transferred_blocks
        local = drv.run(f"{model}-local-{i}", prompt, sp_proto, local_prefill=True)
        assert local.error is None and local.token_ids == ref[i]
        # The first token answered before the KV landed (PrefillStream), then decoded as usual.
        streamed = drv.run(f"{model}-stream-{i}", prompt, sp_proto, stream=True)
        assert streamed.error is None and streamed.token_ids == ref[i]
        assert streamed.first_token_before_kv
    p.wait_idle_and_clean()
    d.wait_idle_and_clean()


def test_first_token_can_end_the_request(pair):
    model, p, d, llm = pair
    drv = PDDriver(p.address, d.address, SECRET)
    res = drv.run(f"{model}-one", _prompts(llm, model)[0], common_pb2.SamplingParams(temperature=0.0, max_tokens=1))
    assert res.error is None and len(res.token_ids) == 1 and res.finish_reason == common_pb2.FINISH_REASON_LENGTH
    d.wait_idle_and_clean()
