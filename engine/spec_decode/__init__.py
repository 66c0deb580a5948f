"""Speculative decoding: proposers (n-gram lookup, draft model), exact verification, adaptive policy.

    ngram.py      prompt-lookup proposer (no extra model)
    draft.py      draft-model proposer with its own paged KV cache
    rejection.py  exact-match and rejection-sampling verification
    policy.py     per-request k from acceptance rates; off when verification costs more than it saves
    metrics.py    baton:spec_decode_* counters
    decoder.py    SpecDecoder, the engine hook (propose before scheduling, verify after the forward)

Use: ``engine.set_spec(build_spec_decoder(engine, SpecConfig(method="ngram")))``, or
``LLM(..., speculative=SpecConfig(...))``.
"""

from __future__ import annotations

from engine.spec_decode.decoder import SpecConfig, SpecDecoder
from engine.spec_decode.draft import DraftModelProposer
from engine.spec_decode.metrics import SpecDecodeMetrics
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.policy import AdaptivePolicy, PolicyConfig
from engine.spec_decode.rejection import RejectionSampler

__all__ = [
    "AdaptivePolicy",
    "DraftModelProposer",
    "NgramProposer",
    "PolicyConfig",
    "RejectionSampler",
    "SpecConfig",
    "SpecDecodeMetrics",
    "SpecDecoder",
    "build_spec_decoder",
    "load_draft_engine",
]


def load_draft_engine(target, config: SpecConfig):
    """The draft model as an engine sharing the target's device, dtype, block size and context, with
    prefix caching off and (by default) as many KV blocks as the target has."""
    from engine.builder import load_engine
    from engine.config import CacheConfig, SchedulerConfig

    cfg = target.config
    num_blocks = config.draft_num_blocks or target.kv.pool.num_blocks
    draft, _ = load_engine(
        config.draft_model,
        dtype=cfg.dtype,
        device=cfg.device,
        cache=CacheConfig(
            block_size=target.kv.block_size, num_blocks=num_blocks, enable_prefix_caching=False
        ),
        scheduler=SchedulerConfig(max_num_seqs=cfg.scheduler.max_num_seqs),
        attention_backend=cfg.attention_backend,
        seed=config.draft_seed,
        max_model_len=target.max_model_len,
    )
    return draft


def build_spec_decoder(target, config: SpecConfig, draft_engine=None, rejection=None) -> SpecDecoder:
    """A spec decoder for engine ``target``. With ``method="draft"`` the draft model is loaded from
    ``config.draft_model`` unless ``draft_engine`` (built with prefix caching off) is given."""
    if config.method == "ngram":
        proposer = NgramProposer(config.ngram_min, config.ngram_max)
    else:
        draft_engine = draft_engine or load_draft_engine(target, config)
        proposer = DraftModelProposer(draft_engine, config.draft_catch_up_tokens)
    return SpecDecoder(proposer, config, rejection)
