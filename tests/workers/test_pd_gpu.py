"""P on cuda:0 -> KV over NCCL -> D on cuda:1 (separate processes) is token-identical to the aggregated
engine on one GPU (float32), with the prompt-completing chunk's KV sent before its first token is read
back, through the unary Prefill, through PrefillStream, and with the KV target following the prefill."""

from __future__ import annotations

import pytest

from baton.pd_driver import PDDriver
from baton.v1 import common_pb2
from tests.workers.cluster import SECRET, WorkerProcess

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multi_gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

MODEL = "dummy:tiny-llama"
COMMON = ["--dtype", "float32", "--block-size", "16", "--num-kv-blocks", "512"]
LENGTHS = [1, 15, 16, 17, 63, 64, 65, 200, 333]  # around block (16) and chunk (64) boundaries


def test_disaggregated_on_two_gpus_matches_aggregated() -> None:
    from engine.llm import LLM
    from engine.sampling.params import SamplingParams

    prompts = [[(11 * i + n) % 300 + 5 for i in range(n)] for n in LENGTHS]
    longer = [prompt + [7] for prompt in prompts]  # P's prefix cache hits on the prompts above
    llm = LLM(MODEL, device="cuda:0", dtype="float32", block_size=16, num_kv_blocks=512, max_num_batched_tokens=64)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate(prompts + longer, greedy)]
    del llm
    torch.cuda.empty_cache()
    d = WorkerProcess("decode", MODEL, *COMMON, "--device", "cuda:1")
    p = WorkerProcess("prefill", MODEL, *COMMON, "--device", "cuda:0", "--chunk", "64")
    try:
        drv = PDDriver(p.address, d.address, SECRET)
        sp = common_pb2.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            unary = drv.run(f"u{i}", prompt, sp)
            assert unary.error is None and unary.token_ids == ref[i], f"prompt length {len(prompt)}"
            streamed = drv.run(f"s{i}", longer[i], sp, stream=True)
            assert streamed.error is None and streamed.first_token_before_kv
            assert streamed.token_ids == ref[len(prompts) + i], f"prompt length {len(longer[i])}"
            # As the router runs it: P starts before D's target exists, the target follows.
            follows = drv.run(f"f{i}", prompt, sp, target_follows=True)
            assert follows.error is None and follows.token_ids == ref[i], f"prompt length {len(prompt)}"
        p.wait_idle_and_clean()
        d.wait_idle_and_clean()
    finally:
        p.stop()
        d.stop()
