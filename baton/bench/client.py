"""Streaming client for OpenAI-compatible servers: one request in, one timed ``RequestResult`` out.

Timing definitions (all ``time.perf_counter`` seconds, measured at the client):
- TTFT: from just before the request is sent to the first SSE chunk that carries text.
- ITL: the gap between consecutive text-carrying chunks (one entry per chunk, so a chunk holding
  several tokens counts as one gap, as in vLLM's bench).
- e2e latency: from send to the end of the stream.
- output tokens: ``usage.completion_tokens`` from the final chunk (``stream_options.include_usage``);
  when the server does not report usage, the number of text-carrying chunks.

``send`` never raises for a server or network problem and never outlives ``timeout_s``: every
failure becomes a ``RequestResult`` with ``success=False`` and an error message.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from baton.bench.datasets import BenchRequest

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
MAX_ERROR_CHARS = 500
DRAIN_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class RequestResult:
    """What one request measured. Latencies in seconds; ``ttft``/``e2el`` are None on failure."""

    success: bool
    prompt_len: int  # server-reported prompt tokens when available, else the dataset's estimate
    output_len: int  # see module docstring; 0 on failure
    ttft: float | None
    itl: tuple[float, ...]
    e2el: float | None
    send_time: float  # perf_counter at send
    error: str = ""
    kind: str = "default"


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str  # scheme://host:port, without the /v1 suffix
    model: str
    endpoint: str = "completions"  # "chat" | "completions"
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINT_PATHS)}, got {self.endpoint!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout_s}")

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINT_PATHS[self.endpoint]


def normalize_base_url(base_url: str) -> str:
    """Accept ``http://h:p``, ``http://h:p/`` and ``http://h:p/v1``."""
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base URL must start with http:// or https://, got {base_url!r}")
    return url


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(config: EndpointConfig, request: BenchRequest) -> dict:
    payload: dict = {
        "model": config.model,
        "max_tokens": request.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        payload["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        payload["prompt"] = request.prompt_text()
    if config.ignore_eos:
        payload["ignore_eos"] = True
    return payload


def error_message(status: int, body: bytes) -> str:
    """``HTTP 400: <message>`` from an OpenAI error body, or the start of the raw body."""
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    message = _error_field(parsed) if isinstance(parsed, dict) else None
    return f"HTTP {status}: {(message or text).strip()[:MAX_ERROR_CHARS]}"


def _error_field(body: dict) -> str | None:
    """The message of ``{"error": {"message": ...}}``, ``{"message": ...}`` or ``{"detail": ...}``."""
    err = body.get("error", body)
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    if isinstance(err, str):
        return err
    detail = body.get("detail")
    return detail if isinstance(detail, str) else None


def chunk_text(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    if endpoint == "chat":
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choices[0].get("text") or ""


class _StreamState:
    """Accumulates timings as chunks arrive (kept outside ``send`` so a timeout keeps what was seen)."""

    def __init__(self, send_time: float) -> None:
        self.send_time = send_time
        self.first_token_time: float | None = None
        self.last_token_time = send_time
        self.itl: list[float] = []
        self.text_chunks = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finished = False  # saw [DONE] or a finish_reason
        self.end_time: float | None = None  # when [DONE] (or the end of the stream) arrived

    def on_chunk(self, chunk: dict, endpoint: str, now: float) -> None:
        if chunk.get("error"):
            message = _error_field(chunk) or json.dumps(chunk)
            raise _StreamError(f"stream error: {message[:MAX_ERROR_CHARS]}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                self.completion_tokens = usage["completion_tokens"]
        choices = chunk.get("choices") or []
        if choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
            self.finished = True
        if chunk_text(chunk, endpoint):
            if self.first_token_time is None:
                self.first_token_time = now
            else:
                self.itl.append(now - self.last_token_time)
            self.last_token_time = now
            self.text_chunks += 1


class _StreamError(Exception):
    pass


class OpenAIStreamClient:
    """Sends ``BenchRequest``s to one endpoint over a shared ``httpx.AsyncClient``."""

    def __init__(self, config: EndpointConfig, http: httpx.AsyncClient) -> None:
        self._config = config
        self._http = http

    async def send(self, request: BenchRequest) -> RequestResult:
        state = _StreamState(time.perf_counter())
        try:
            async with asyncio.timeout(self._config.timeout_s):
                await self._stream(request, state)
        except TimeoutError:
            if state.end_time is None:  # a deadline hit while draining after [DONE] is no failure
                return self._failure(request, state, f"timeout after {self._config.timeout_s:g}s")
        except _StreamError as exc:
            return self._failure(request, state, str(exc))
        except httpx.HTTPError as exc:
            return self._failure(request, state, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return self._failure(request, state, f"malformed SSE data: {exc}"[:MAX_ERROR_CHARS])
        except Exception as exc:  # one odd response must not end the whole benchmark
            return self._failure(request, state, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
        if state.first_token_time is None:
            return self._failure(request, state, "stream ended without any generated text")
        if not state.finished:
            return self._failure(request, state, "stream ended before [DONE] or a finish_reason")
        output_len = state.completion_tokens if state.completion_tokens is not None else state.text_chunks
        return RequestResult(
            success=True,
            prompt_len=state.prompt_tokens if state.prompt_tokens is not None else request.prompt_len,
            output_len=output_len,
            ttft=state.first_token_time - state.send_time,
            itl=tuple(state.itl),
            e2el=(state.end_time or state.last_token_time) - state.send_time,
            send_time=state.send_time,
            kind=request.kind,
        )

    async def _stream(self, request: BenchRequest, state: _StreamState) -> None:
        payload = build_payload(self._config, request)
        headers = auth_headers(self._config.api_key)
        async with self._http.stream("POST", self._config.url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                raise _StreamError(error_message(response.status_code, await response.aread()))
            lines = response.aiter_lines()
            async for line in lines:
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments (":"), "event:" lines
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    state.finished = True
                    state.end_time = time.perf_counter()
                    await _drain(lines)
                    return
                chunk = json.loads(data)
                if isinstance(chunk, dict):
                    state.on_chunk(chunk, self._config.endpoint, time.perf_counter())
            state.end_time = time.perf_counter()

    @staticmethod
    def _failure(request: BenchRequest, state: _StreamState, error: str) -> RequestResult:
        return RequestResult(
            success=False,
            prompt_len=request.prompt_len,
            output_len=0,
            ttft=None,
            itl=(),
            e2el=None,
            send_time=state.send_time,
            error=error,
            kind=request.kind,
        )


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read what follows ``[DONE]`` (the end of the chunked body) so the connection goes back to the
    pool: closing an unfinished HTTP/1.1 response drops the connection, and the next request would
    then pay a TCP connect inside its TTFT. A server that keeps the stream open past ``[DONE]``
    costs at most ``DRAIN_TIMEOUT_S`` (after the request's timings were taken)."""
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for _ in lines:
                pass
    except (TimeoutError, httpx.HTTPError):
        pass  # the connection is closed instead of reused; the measurement is unaffected


async def fetch_model_id(http: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The first model listed by ``GET /v1/models``; a clear error when there is none."""
    try:
        response = await http.get(base_url + "/v1/models", headers=auth_headers(api_key))
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach {base_url}/v1/models: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise RuntimeError(f"GET /v1/models failed: {error_message(response.status_code, response.content)}")
    data = response.json().get("data") or []
    if not data or not isinstance(data[0], dict) or not data[0].get("id"):
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])


async def measure_tokens_per_word(
    http: httpx.AsyncClient, base_url: str, model: str, api_key: str | None, sample: str
) -> float | None:
    """Tokens per word of ``sample`` per the server's ``POST /tokenize`` (vLLM's shape: a ``count``
    or a ``tokens`` list). None when the server has no such endpoint or answers something else."""
    payload = {"model": model, "prompt": sample, "add_special_tokens": False}
    try:
        response = await http.post(base_url + "/tokenize", json=payload, headers=auth_headers(api_key))
        if response.status_code != 200:
            return None
        body = response.json()
    except (httpx.HTTPError, json.JSONDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    count = body.get("count")
    if not isinstance(count, int) and isinstance(body.get("tokens"), list):
        count = len(body["tokens"])
    words = len(sample.split())
    if not isinstance(count, int) or count <= 0 or words == 0:
        return None
    return count / words
