"""The offline API: ``LLM(model).generate(prompts, sampling)`` and ``LLM.chat(messages, sampling)``.

Text in, text out, on the aggregated engine; stop strings are matched on incrementally detokenized
text (the engine itself only knows token ids).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from baton.text import IncrementalDetokenizer, Tokenizer
from engine.builder import load_engine
from engine.config import CacheConfig, SchedulerConfig
from engine.request import FinishReason
from engine.sampling.params import SamplingParams
from engine.spec_decode.decoder import SpecConfig

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0


class _TextTracker:
    """Incremental text of one request, with stop-string detection on the text produced so far."""

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self.stop = sampling.stop
        self.include_stop = sampling.include_stop_str_in_output
        self.text = ""
        self.emitted = 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # may still become a stop string

    def push(self, token_id: int, final: bool) -> tuple[str, bool]:
        """Returns (new text safe to show, stop string hit)."""
        if self.detok is None:
            return "", False
        self.text += self.detok.push(token_id)
        if final:
            self.text += self.detok.flush()
        for s in self.stop:
            idx = self.text.find(s, max(0, self.emitted - len(s)))
            if idx >= 0:
                self.text = self.text[: idx + (len(s) if self.include_stop else 0)]
                return self._emit(len(self.text)), True
        upto = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        return self._emit(upto), False

    def push_all(self, token_ids: Sequence[int], final: bool) -> tuple[str, bool, int]:
        """``push`` each token in turn. Returns (new text, stop string hit, tokens consumed)."""
        text = ""
        for i, token_id in enumerate(token_ids):
            delta, stopped = self.push(token_id, final and i == len(token_ids) - 1)
            text += delta
            if stopped:
                return text, True, i + 1
        return text, False, len(token_ids)

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return out


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int = 1 << 30,
        max_model_len: int | None = 4096,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        attention_backend: str = "auto",
        seed: int = 0,
        quantization: str | None = None,
        speculative: SpecConfig | None = None,
    ) -> None:
        """``speculative``: speculative decoding (n-gram or draft model), see ``engine.spec_decode``."""
        self.engine, self.source = load_engine(
            model,
            dtype=dtype,
            device=device,
            cache=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching, cpu_kv_cache_bytes=kv_cache_bytes),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
            attention_backend=attention_backend,
            seed=seed,
            max_model_len=max_model_len,
            quantization=quantization,
        )
        self.tokenizer = Tokenizer.from_dir(self.source.tokenizer_dir) if self.source.tokenizer_dir else None
        self._ids = itertools.count()
        if speculative is not None:
            from engine.spec_decode import build_spec_decoder

            if speculative.method == "draft" and speculative.draft_model is None:
                speculative = replace(speculative, draft_model=model)  # the target as its own draft
            self.engine.set_spec(build_spec_decoder(self.engine, speculative))

    # --- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (dummy weights): pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def render_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (dummy weights): chat needs one")
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)

    # --- generation --------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], sampling: SamplingParams | None = None, use_tqdm: bool = False) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([self.encode(p) for p in prompts], sampling or SamplingParams(), use_tqdm)

    def chat(self, conversations: list[dict] | list[list[dict]], sampling: SamplingParams | None = None, use_tqdm: bool = False) -> list[CompletionOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([self.render_chat(c) for c in conversations], sampling or SamplingParams(), use_tqdm)

    def stream(self, prompt_ids: list[int], sampling: SamplingParams) -> Iterator[str]:
        """Text deltas of one request as they are produced (used by ``baton chat``)."""
        rid = f"s{next(self._ids)}"
        req = self.engine.add_request(rid, prompt_ids, sampling)
        tracker = _TextTracker(self.tokenizer, prompt_ids, sampling)
        try:
            while not req.is_finished:
                for o in self.engine.step():
                    if o.request_id != rid:
                        continue
                    delta, stopped, _ = tracker.push_all(o.new_token_ids, o.finished)
                    if stopped:
                        self.engine.finish(req, FinishReason.STOP)
                    if delta:
                        yield delta
        finally:
            self.engine.abort(rid)

    def _run(self, prompt_ids: list[list[int]], sampling: SamplingParams | Sequence[SamplingParams], use_tqdm: bool) -> list[CompletionOutput]:
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling] * len(prompt_ids)
        outs: dict[str, CompletionOutput] = {}
        trackers: dict[str, _TextTracker] = {}
        reqs = {}
        for ids, sp in zip(prompt_ids, params, strict=True):
            rid = f"g{next(self._ids)}"
            reqs[rid] = self.engine.add_request(rid, ids, sp)
            outs[rid] = CompletionOutput(rid, ids)
            trackers[rid] = _TextTracker(self.tokenizer, ids, sp)
        bar = tqdm(total=len(outs), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for o in self.engine.step():
                out = outs.get(o.request_id)
                if out is None:
                    continue
                # A speculative step may emit several tokens: a stop string ends them where it matched.
                delta, stopped, n = trackers[o.request_id].push_all(o.new_token_ids, o.finished)
                out.token_ids.extend(o.new_token_ids[:n])
                out.logprobs.extend(o.new_logprobs[:n])
                out.num_cached_tokens = o.num_cached_tokens
                out.text += delta
                if stopped and not o.finished:
                    self.engine.finish(reqs[o.request_id], FinishReason.STOP)
                if stopped or o.finished:
                    out.finish_reason = "stop" if stopped else o.finish_reason.value
                    bar.update(1)
        bar.close()
        return list(outs.values())
