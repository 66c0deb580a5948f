"""Test helpers for the router: a tiny real tokenizer folder, a deterministic fake backend (a unit
test of the router as the backend's caller), and a uvicorn server on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from baton.text import Tokenizer
from router.backend import (
    BackendError,
    BackendErrorKind,
    FinishReason,
    GenerateRequest,
    ModelInfo,
    Route,
    TokenEvent,
    TokenLogprob,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello from Baton! The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer briefly and politely.",
    "user assistant system: what is the capital of France? Paris is the capital.",
    "Numbers 0123456789 and punctuation ,.;:!?'\"()[]{} and unicode: café, naïve, 日本語, emoji 🙂.",
]
REPLY = "Hello from Baton! The quick brown fox jumps over the lazy dog."


def build_tokenizer_dir(folder: Path) -> Path:
    """A byte-level BPE (any text encodes) with ChatML specials and template."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML})
    )
    return folder


@dataclass
class FakeBackend:
    """Deterministic stand-in for the workers.

    Each sequence replays the tokens of ``REPLY`` (rotated by ``seed`` so n>1 choices differ), then
    EOS (finish "stop") unless ``ignore_eos``; it honours max_tokens and min_tokens, reports logprobs,
    cached tokens and a route, and records every request and abort. ``token_delay_s`` paces tokens;
    ``fail_after`` makes a sequence raise after that many tokens.
    """

    tokenizer: Tokenizer
    max_model_len: int = 256
    token_delay_s: float = 0.0
    fail_after: int | None = None
    fail_kind: BackendErrorKind = BackendErrorKind.UNAVAILABLE
    is_ready: bool = True
    requests: list[GenerateRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    started: bool = False
    closed: bool = False

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(max_model_len=self.max_model_len, vocab_size=self.tokenizer.vocab_size)

    def ready(self) -> bool:
        return self.is_ready

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def reply_ids(self, seed: int | None) -> list[int]:
        ids = self.tokenizer.encode(REPLY, add_special_tokens=False)
        shift = (seed or 0) % len(ids)
        return ids[shift:] + ids[:shift]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        if self.fail_after == 0:
            raise BackendError(self.fail_kind, "injected failure before the first token")
        s = request.sampling
        reply = self.reply_ids(s.seed)
        eos = self.tokenizer.eos_token_ids[0]
        prompt_len = len(request.prompt_token_ids)
        for i in range(s.max_tokens):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            if self.fail_after is not None and i >= self.fail_after:
                raise BackendError(self.fail_kind, "injected failure mid-stream")
            past_reply = i >= len(reply) and not s.ignore_eos and i >= s.min_tokens
            token = eos if past_reply else reply[i % len(reply)]
            stopping = i >= s.min_tokens and (token == eos or token in s.stop_token_ids)
            last = stopping or i == s.max_tokens - 1
            finish = FinishReason.STOP if stopping else FinishReason.LENGTH if last else None
            logprobs = ()
            if s.logprobs:
                lp = -0.125 * (i % 4)
                top = tuple(((token + k) % self.tokenizer.vocab_size, lp - k) for k in range(s.top_logprobs))
                logprobs = (TokenLogprob(lp, top),)
            if last:  # recorded before the yield: the consumer may close the stream right after it
                self.finished.append(request.request_id)
            yield TokenEvent(
                token_ids=(token,),
                logprobs=logprobs,
                finish_reason=finish,
                stop_token_id=token if finish == FinishReason.STOP else None,
                num_cached_tokens=(prompt_len // 16) * 16 if i == 0 else 0,
                route=Route("d0", "p0" if prompt_len >= 32 else None) if i == 0 else None,
            )
            if last:
                return


@contextmanager
def serve(app) -> Iterator[str]:
    """Runs ``app`` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
