"""Speculative decoding on a decode worker (separate processes, gloo): greedy output is
token-identical to the aggregated engine without speculation, with the n-gram proposer and with a
draft model, whether the prompt's KV came from a prefill worker (the draft then prefills the prompt
on the decode worker) or the decode worker prefilled locally. No block is left behind."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from baton.pd_driver import PDDriver
from baton.v1 import common_pb2
from engine.llm import LLM
from engine.sampling.params import SamplingParams
from tests.workers.cluster import SECRET, WorkerProcess

COMMON = ["--block-size", "4", "--num-kv-blocks", "512"]
# The target as its own draft: it accepts (nearly) every draft only if the draft's KV of the prompt
# really exists on the decode worker (the proposer prefills it there when the target's KV lands).
# Such a draft costs as much as the target, so the adaptive policy would rightly switch it off.
DRAFT = ["--speculative", "draft", "--num-speculative-tokens", "4", "--no-adaptive-speculation"]
NGRAM = ["--speculative", "ngram", "--num-speculative-tokens", "6"]


@pytest.fixture(scope="module", params=["dummy:tiny-llama", "default"])
def cluster(request):
    model = request.param
    specs = [
        ("prefill", [*COMMON, "--chunk", "7"]),
        ("decode", [*COMMON, "--chunk", "16", *NGRAM]),
        ("decode", [*COMMON, "--chunk", "16", *DRAFT]),
    ]
    with ThreadPoolExecutor(len(specs)) as pool:  # start the three processes side by side
        futures = [pool.submit(WorkerProcess, role, model, *extra) for role, extra in specs]
        llm = LLM(None if model == "default" else model, block_size=4, num_kv_blocks=512)
        procs = []
        try:
            procs = [f.result() for f in futures]
        except Exception:
            for f in futures:
                if f.exception() is None:
                    f.result().stop()
            raise
    p, d_ngram, d_draft = procs
    yield model, p, {"ngram": d_ngram, "draft": d_draft}, llm
    for proc in procs:
        proc.stop()


def _prompts(llm, model) -> list[list[int]]:
    if model == "default":
        text = "The library will open at nine on weekdays and at ten on weekends, from the first of May."
        return [llm.render_chat([{"role": "user", "content": f"Repeat this sentence exactly: {text}"}])]
    return [[7, 8, 9, 10] * 5, [(7 * i + 3) % 300 + 5 for i in range(13)], [21, 22] * 9 + [5]]


def test_speculative_decode_worker_matches_aggregated(cluster):
    model, p, decoders, llm = cluster
    n = 16 if model == "default" else 20
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    sp_proto = common_pb2.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    prompts = _prompts(llm, model)
    ref = [o.token_ids for o in llm.generate(prompts, sp)]
    for name, d in decoders.items():
        drv = PDDriver(p.address, d.address, SECRET)
        for i, prompt in enumerate(prompts):
            via_p = drv.run(f"{model}-{name}-p-{i}", prompt, sp_proto)
            assert via_p.error is None, via_p.error
            assert via_p.token_ids == ref[i], f"{name}, KV from the prefill worker, prompt {i}"
            local = drv.run(f"{model}-{name}-local-{i}", prompt, sp_proto, local_prefill=True)
            assert local.error is None and local.token_ids == ref[i], f"{name}, local prefill, prompt {i}"
        stats = d.wait_idle_and_clean().stats
        assert stats.spec_decode_num_drafts > 0, f"{name}: speculation never ran"
        assert 0 < stats.spec_decode_num_accepted_tokens <= stats.spec_decode_num_draft_tokens
        if name == "draft":
            assert stats.spec_decode_num_accepted_tokens >= 0.9 * stats.spec_decode_num_draft_tokens
    p.wait_idle_and_clean()
