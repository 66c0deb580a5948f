"""Disaggregated P -> D (separate processes, gloo) is token-identical to the aggregated engine."""

from __future__ import annotations

import asyncio

import pytest

from baton.pd_driver import PDDriver
from baton.v1 import common_pb2
from engine.llm import LLM
from engine.sampling.params import SamplingParams
from router.backend import GenerateRequest, SamplingOptions
from router.cluster_backend import ClusterBackend, ClusterConfig
from router.placement import EmbeddedPlacementStore, WorkerRole
from router.policy import CacheAwarePolicy
from router.registrar import WorkerRegistrar
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
        # As the router runs it: P computes while D reserves, and gets D's target after (SetKVTarget).
        follows = drv.run(f"{model}-follows-{i}", prompt, sp_proto, target_follows=True)
        assert follows.error is None and follows.token_ids == ref[i]
        assert follows.first_token_before_kv
    p.wait_idle_and_clean()
    d.wait_idle_and_clean()


def test_first_token_can_end_the_request(pair):
    model, p, d, llm = pair
    drv = PDDriver(p.address, d.address, SECRET)
    res = drv.run(f"{model}-one", _prompts(llm, model)[0], common_pb2.SamplingParams(temperature=0.0, max_tokens=1))
    assert res.error is None and len(res.token_ids) == 1 and res.finish_reason == common_pb2.FINISH_REASON_LENGTH
    d.wait_idle_and_clean()


@pytest.mark.parametrize("first_token_from", ["prefill", "decode"])
def test_router_streams_the_same_tokens_whoever_sends_the_first(pair, first_token_from):
    # The router's split path over the real workers: with first_token_from=decode the first token
    # waits for the decode worker's first chunk (the request joined its batch), and nothing is lost
    # or doubled either way, including when that first token ends the request.
    model, p, d, llm = pair
    if model != "dummy:tiny-llama":
        pytest.skip("one model is enough for the router's part")
    prompts = _prompts(llm, model)[-4:]
    ref = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))]
    got = asyncio.run(_generate_through_router(p, d, prompts, first_token_from))
    assert got[: len(prompts)] == ref
    assert got[len(prompts) :] == [r[:1] for r in ref]  # max_tokens=1: P's token, once
    p.wait_idle_and_clean()
    d.wait_idle_and_clean()


async def _generate_through_router(p, d, prompts, first_token_from: str) -> list[list[int]]:
    info = d.info()
    store = EmbeddedPlacementStore()
    registrar = WorkerRegistrar(store, secret=SECRET)
    assert await registrar.poll_once([(d.address, WorkerRole.DECODE), (p.address, WorkerRole.PREFILL)]) == 2
    config = ClusterConfig(
        info.model_fingerprint, info.block_size, info.max_model_len, secret=SECRET, first_token_from=first_token_from
    )
    backend = ClusterBackend(config, store, CacheAwarePolicy(local_prefill_threshold=0))
    out = []
    try:
        for max_tokens in (12, 1):
            for i, prompt in enumerate(prompts):
                request = GenerateRequest(
                    f"router-{first_token_from}-{max_tokens}-{i}",
                    tuple(prompt),
                    SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                )
                events = [event async for event in backend.generate(request)]
                assert events[0].route.decision == "split" and events[-1].finish_reason is not None
                out.append([t for event in events for t in event.token_ids])
    finally:
        await backend.close()
    return out
