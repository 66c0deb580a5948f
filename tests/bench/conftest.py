"""A small real OpenAI-compatible SSE server with known timing, for testing the bench client.

It streams ``max_tokens`` tokens (or stops early at ``eos_after`` unless ``ignore_eos``): the first
text chunk ``ttft_s`` after the request, then one chunk every ``itl_s``. Chat streams open with a
role-only chunk (no text), as real servers do, so TTFT must skip it. Prompts containing a marker
word trigger failures: ``FAILME`` -> HTTP 500, ``BREAKME`` -> an error event after two tokens,
``HANGME`` -> the stream stalls forever after its first chunk.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "fake-model"


@dataclass(frozen=True)
class Behaviour:
    ttft_s: float = 0.05
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    eos_after: int | None = None  # tokens before a natural stop when ignore_eos is false
    report_usage: bool = True
    tokenize_tokens_per_word: float | None = 1.5  # None: no /tokenize endpoint
    max_prompt_words: int | None = None  # longer prompts get HTTP 400, like a context-length limit


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


def make_app(behaviour: Behaviour, seen_payloads: list[dict], client_ports: list[int]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        if behaviour.tokenize_tokens_per_word is None:
            return _error(404, "not found")
        body = await request.json()
        return {"count": round(len(body["prompt"].split()) * behaviour.tokenize_tokens_per_word)}

    async def generate(request: Request, chat: bool):
        body = await request.json()
        seen_payloads.append(body)
        client_ports.append(request.client.port if request.client else -1)
        if body.get("model") != MODEL:
            return _error(404, f"model {body.get('model')!r} does not exist")
        prompt = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        if "FAILME" in prompt:
            return _error(500, "injected failure")
        if behaviour.max_prompt_words is not None and len(prompt.split()) > behaviour.max_prompt_words:
            return _error(400, f"prompt has {len(prompt.split())} words, limit {behaviour.max_prompt_words}")
        max_tokens = int(body["max_tokens"])
        count = (
            max_tokens
            if body.get("ignore_eos") or behaviour.eos_after is None
            else min(max_tokens, behaviour.eos_after)
        )
        prompt_tokens = len(prompt.split())
        if behaviour.tokenize_tokens_per_word is not None:
            prompt_tokens = round(prompt_tokens * behaviour.tokenize_tokens_per_word)
        usage_wanted = behaviour.report_usage and (body.get("stream_options") or {}).get("include_usage")

        def event(text: str | None, finish: str | None = None, usage: dict | None = None) -> str:
            if usage is not None:
                choices = []
            elif chat:
                delta = {"role": "assistant"} if text is None else {"content": text}
                choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
            else:
                choices = [{"index": 0, "text": text or "", "finish_reason": finish}]
            chunk = {"id": "x", "object": "chunk", "model": MODEL, "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        async def stream():
            start = time.perf_counter()
            if chat:
                yield event(None)
            if "HANGME" in prompt:
                await asyncio.sleep(3600)
            sent = 0
            chunk_index = 0
            while sent < count:
                # Absolute schedule, so server-side sleep jitter does not accumulate.
                due = start + behaviour.ttft_s + chunk_index * behaviour.itl_s
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                n = min(behaviour.tokens_per_chunk, count - sent)
                sent += n
                chunk_index += 1
                if "BREAKME" in prompt and sent > 2:
                    yield 'data: {"error": {"message": "worker lost", "code": 503}}\n\n'
                    return
                yield event(" tok" * n, "length" if sent == count else None)
            if usage_wanted:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": count,
                    "total_tokens": prompt_tokens + count,
                }
                yield event(None, usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    return app


@dataclass
class RunningServer:
    base_url: str
    payloads: list[dict]  # generation request bodies, in arrival order
    client_ports: list[int]  # the client's source port per generation request (one per connection)


@contextmanager
def serve(behaviour: Behaviour) -> Iterator[RunningServer]:
    payloads: list[dict] = []
    client_ports: list[int] = []
    config = uvicorn.Config(
        make_app(behaviour, payloads, client_ports),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test SSE server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", payloads, client_ports)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def sse_server() -> Callable[..., object]:
    """``with sse_server(Behaviour(...)) as srv:`` -> a running server at ``srv.base_url``."""
    return serve
