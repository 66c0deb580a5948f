"""Assemble an engine from weights: model on device, KV cache sized from memory, runner, scheduler."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from engine.attention.base import AttentionMetadata, get_attention_backend
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, model_fingerprint
from engine.engine import LLMEngine
from engine.kv_cache.manager import KVCacheManager
from engine.kv_cache.storage import allocate_kv_cache
from engine.models import model_class
from engine.models.llama import LlamaForCausalLM
from engine.runner import DEFAULT_MAX_GRAPH_BATCH, ModelRunner
from engine.sampling.sampler import Sampler

logger = logging.getLogger(__name__)


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return default_dtype(device)
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)} or 'auto'")
    return table[name]


def _quantized_dtype(dtype: str | torch.dtype | None, quantization: str | None) -> str | torch.dtype | None:
    """The int4 mode computes in bf16: ``auto`` means bf16 there (the model, activations, KV cache)."""
    if quantization == "int4" and dtype in (None, "auto"):
        return "bfloat16"
    return dtype


def build_model(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str, max_positions: int
) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = model_class(cfg)(cfg, max_positions=max_positions)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty() gives each module its own tensor: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers (rope tables) were not materialised on meta: rebuild them on the device in fp32.
    model.rope = type(model.rope)(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling_dict).to(
        device
    )
    model.load_hf_weights(tensors)
    return model.to(dtype).eval()


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


def plan_num_blocks(
    cfg: ModelConfig,
    cache: CacheConfig,
    dtype: torch.dtype,
    device: str,
    *,
    model: LlamaForCausalLM | None = None,
    scheduler: SchedulerConfig | None = None,
    attention_backend: str = "auto",
) -> int:
    """Blocks that fit: a byte budget on CPU; on GPU, ``gpu_memory_utilization`` of the card's
    memory minus what is in use (weights, other processes) minus the activation peak of the
    largest step, measured by running one (``profile_step_peak``) when the model is given."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = kv_bytes_per_block(cfg, cache.block_size, dtype)
    if torch.device(device).type == "cuda":
        dev = torch.device(device)
        if model is not None:
            reserve = profile_step_peak(
                model, cfg, scheduler or SchedulerConfig(), cache.block_size, attention_backend
            )
        else:
            reserve = 1 << 30  # no model to profile: a fixed allowance for activations
        torch.cuda.empty_cache()  # memory cached by the allocator is free for the KV cache
        free, total = torch.cuda.mem_get_info(dev)
        budget = int(total * cache.gpu_memory_utilization) - (total - free) - reserve
    else:
        budget = cache.cpu_kv_cache_bytes
    if budget < per_block:
        raise MemoryError(
            f"no memory left for the KV cache (budget {budget} B, one block needs {per_block} B)"
        )
    return budget // per_block


@torch.inference_mode()
def profile_step_peak(
    model: LlamaForCausalLM,
    cfg: ModelConfig,
    scheduler: SchedulerConfig,
    block_size: int,
    attention_backend: str,
) -> int:
    """Bytes of activation memory a step may need beyond the weights, measured on the device.

    Runs the two extreme steps on a scratch KV cache: ``max_num_batched_tokens`` tokens spread over
    ``max_num_seqs`` sequences, every one sampled (largest hidden states and logits), and a decode
    step of ``max_num_seqs`` sequences (what a CUDA graph keeps in its own memory pool). Returns the
    sum of the two peaks: the eager allocator cache and the graph pool do not share memory.
    """
    device = model.embed_tokens.weight.device
    attn = get_attention_backend(attention_backend, device)
    num_seqs = max(1, min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens))
    tokens = max(scheduler.max_num_batched_tokens, num_seqs)
    lens = [tokens // num_seqs + (1 if i < tokens % num_seqs else 0) for i in range(num_seqs)]
    prefill_peak = _step_peak(model, cfg, block_size, attn, lens)
    decode_peak = _step_peak(model, cfg, block_size, attn, [1] * num_seqs)
    return prefill_peak + decode_peak


def _block_major(layout: str, attn, device) -> bool:
    """Resolve ``CacheConfig.layout``: block-major on a GPU where the backend reads it (a request's
    consecutive blocks are then one range of memory, sent to another worker with no gather)."""
    if layout == "auto":
        return torch.device(device).type == "cuda" and attn.reads_block_major
    if layout == "block-major" and not attn.reads_block_major:
        raise ValueError(f"the {attn.name!r} attention backend cannot read a block-major KV cache")
    return layout == "block-major"


def _step_peak(model, cfg: ModelConfig, block_size: int, attn, query_lens: list[int]) -> int:
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    blocks = [-(-n // block_size) for n in query_lens]
    width = max(blocks)
    kv = torch.zeros(
        cfg.num_layers, 2, sum(blocks), block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device
    )
    table = torch.zeros(len(query_lens), width, dtype=torch.int32)
    first = 0
    slots = []
    for i, (n, nb) in enumerate(zip(query_lens, blocks, strict=True)):
        table[i, :nb] = torch.arange(first, first + nb)
        slots.append(torch.arange(n) + first * block_size)
        first += nb
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(query_lens).cumsum(0)
    meta = AttentionMetadata(
        query_start_loc=starts.to(device),
        seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
        block_tables=table.to(device),
        slot_mapping=torch.cat(slots).to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(query_lens),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(query_lens),
    )
    total = int(starts[-1])
    ids = torch.zeros(total, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n) for n in query_lens]).to(device)
    rows = (starts[1:] - 1).long().to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    hidden = model(ids, positions, kv, meta, attn)
    logits = model.compute_logits(hidden[rows])
    torch.log_softmax(logits, dim=-1)  # the sampler's widest temporaries (logprobs, top-k/p)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del hidden, logits, kv
    return peak


def build_engine(
    hf_config: dict,
    tensors: dict[str, torch.Tensor],
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    cache: CacheConfig | None = None,
    scheduler: SchedulerConfig | None = None,
    attention_backend: str = "auto",
    weights_id: str = "",
    seed: int = 0,
    max_model_len: int | None = None,
    quantization: str | None = None,
    capture_graphs: bool = True,
    quantization_gguf: str | None = None,
) -> LLMEngine:
    """The engine for ``tensors`` (HF names). On CUDA with Triton attention, ``capture_graphs``
    records the CUDA graphs of every step size up front: captured lazily, the first step of each new
    size would stall the whole engine (a capture synchronises the device) while it serves."""
    cfg = ModelConfig.from_hf_dict(hf_config)
    dt = parse_dtype(_quantized_dtype(dtype, quantization), device)
    cache = cache or CacheConfig()
    scheduler = scheduler or SchedulerConfig()
    limit = max_model_len or scheduler.max_model_len or cfg.max_position_embeddings
    limit = min(limit, cfg.max_position_embeddings, cfg.sliding_window or limit)
    scheduler = replace(scheduler, max_model_len=limit)
    model = build_model(cfg, tensors, dt, device, max_positions=limit)
    if quantization not in (None, "none"):
        from engine.quantization import quantize_model

        # quantization_gguf: the GGUF the tensors came from; int4 uses its Q4_1 blocks as stored.
        quantize_model(model, quantization, gguf_path=quantization_gguf)
    num_blocks = plan_num_blocks(
        cfg, cache, dt, device, model=model, scheduler=scheduler, attention_backend=attention_backend
    )
    config = EngineConfig(
        cfg, replace(cache, num_blocks=num_blocks), scheduler, dt, device, attention_backend, seed
    )
    attn = get_attention_backend(attention_backend, device)
    kv_cache = allocate_kv_cache(
        cfg.num_layers, num_blocks, cache.block_size, cfg.num_kv_heads, cfg.head_dim,
        dtype=dt, device=device, block_major=_block_major(cache.layout, attn, device),
    )  # fmt: skip
    fingerprint = model_fingerprint(cfg, dt, cache.block_size, weights_id)
    kv = KVCacheManager(num_blocks, cache.block_size, fingerprint, cache.enable_prefix_caching)
    runner = ModelRunner(
        model,
        kv_cache,
        attn,
        cache.block_size,
        Sampler(seed),
        max_graph_batch=min(DEFAULT_MAX_GRAPH_BATCH, scheduler.max_num_batched_tokens),
    )
    if capture_graphs and runner.graphs is not None:
        seconds = runner.capture_cuda_graphs()
        logger.info("captured %d CUDA graphs in %.1f s", len(runner.graphs.graphs), seconds)
    engine = LLMEngine(config, runner, kv, cfg.eos_token_ids)
    engine.fingerprint = fingerprint
    return engine


def load_engine(
    model: str | None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    cache: CacheConfig | None = None,
    scheduler: SchedulerConfig | None = None,
    attention_backend: str = "auto",
    seed: int = 0,
    max_model_len: int | None = None,
    quantization: str | None = None,
):
    """Resolve a model spec, load its weights and build the engine. Returns (engine, source)."""
    from engine.model_source import resolve_model
    from engine.weights import load_weights

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # weights, cache and graphs all on this GPU
    source = resolve_model(model)
    dt = parse_dtype(_quantized_dtype(dtype, quantization), device)
    weights = load_weights(source, dt, device, seed)
    weights_id = source.weights_id + (f":seed={seed}" if source.kind == "dummy" else "")
    engine = build_engine(
        weights.hf_config,
        weights.tensors,
        dtype=dt,
        device=device,
        cache=cache,
        scheduler=scheduler,
        attention_backend=attention_backend,
        weights_id=weights_id + (f":{quantization}" if quantization else ""),
        seed=seed,
        max_model_len=max_model_len,
        quantization=quantization,
        quantization_gguf=str(source.path) if quantization == "int4" and source.kind == "gguf" else None,
    )
    if source.tokenizer_dir:
        from baton.text import Tokenizer

        eos = Tokenizer.from_dir(source.tokenizer_dir).eos_token_ids
        if eos:
            engine.eos_token_ids = tuple(eos)
    engine.model_name = source.name
    return engine, source


def load_worker_engine(config):
    """``load_engine`` from a worker config (prefill or decode: both carry the same engine fields —
    model, dtype, device, seed, block_size, num_kv_blocks, kv_cache_bytes, gpu_memory_utilization,
    max_num_seqs, max_num_batched_tokens, prefill_chunk_tokens, max_model_len). Returns (engine, source)."""
    return load_engine(
        config.model,
        dtype=config.dtype,
        device=config.device,
        cache=CacheConfig(
            block_size=config.block_size,
            num_blocks=config.num_kv_blocks,
            cpu_kv_cache_bytes=config.kv_cache_bytes,
            gpu_memory_utilization=config.gpu_memory_utilization,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            long_prefill_token_threshold=config.prefill_chunk_tokens,
        ),
        seed=config.seed,
        max_model_len=config.max_model_len,
    )
