"""Small drivers for engine tests: run requests to completion, record logits."""

from __future__ import annotations

import random

from engine.builder import build_engine
from engine.config import CacheConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.sampling.params import SamplingParams
from engine.sampling.sampler import Sampler


class RecordingSampler(Sampler):
    """Sampler that keeps every row of logits it was given, per request id."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.logits: dict[str, list] = {}

    def __call__(self, logits, reqs):
        for row, r in zip(logits, reqs, strict=True):
            self.logits.setdefault(r.request_id, []).append(row.detach().clone())
        return super().__call__(logits, reqs)


def make_engine(hf_config, tensors, *, block_size=4, num_blocks=256, max_batched=64, chunk=None, max_seqs=64, prefix=True, record=False) -> LLMEngine:
    eng = build_engine(
        hf_config, tensors,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_batched, long_prefill_token_threshold=chunk),
        attention_backend="torch",
    )
    if record:
        eng.runner.sampler = RecordingSampler()
    return eng


def run_all(eng: LLMEngine, prompts: dict[str, list[int]], sampling: SamplingParams | dict, check_every_step: bool = True) -> dict[str, list[int]]:
    outs = {rid: [] for rid in prompts}
    for rid, p in prompts.items():
        sp = sampling[rid] if isinstance(sampling, dict) else sampling
        eng.add_request(rid, p, sp)
    steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id].extend(o.new_token_ids)
        if check_every_step:
            eng.check_integrity()
        steps += 1
        assert steps < 100_000
    eng.check_integrity()
    return outs


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"r{i}": [rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))] for i in range(n)}
