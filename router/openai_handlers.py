"""Chat and text completions: parse → validate → tokenize → generate → format (SSE or JSON).

Everything a request needs flows through arguments; the only state is the ``OpenAIHandlers`` object
the app factory creates (config, backend, tokenizer, metrics).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from baton.tracing import REQUEST_ID_KEY, valid_request_id
from router.backend import GenerationBackend, SamplingOptions
from router.config import RouterConfig
from router.errors import RouterError, invalid
from router.generation import ChoiceDelta, ChoiceSpec, TextOptions, generate_choices
from router.http_util import SSEResponse
from router.metrics import RequestTracker, RouterMetrics
from router.openai_format import SSE_DONE, ChatFormatter, CompletionFormatter, Formatter
from router.prompts import build_specs, encode_texts, render_chat
from router.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from router.validation import (
    Limits,
    check_chat,
    check_completion,
    check_model,
    pydantic_error,
    stop_strings,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as ``model``; malformed JSON or wrong types are 400s, never 500s."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise RouterError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RouterError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        parsed = model.model_validate(body)
    except ValidationError as err:
        raise pydantic_error(err) from None
    except RecursionError:
        raise RouterError(400, "The request body is nested too deeply.", code="invalid_json") from None
    if parsed.model_extra:
        log.info("ignoring unknown request fields: %s", sorted(parsed.model_extra))
    return parsed


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Runs ``work`` unless the client disconnects first (then ``work`` is cancelled: its cleanup
    aborts the workers). Returns (completed, result)."""
    outcome: list[T] = []
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            outcome.append(await work())
        except Exception as exc:  # re-raised below, outside the task group (no exception groups)
            errors.append(exc)
        tg.cancel_scope.cancel()
    if errors:
        raise errors[0]
    return (True, outcome[0]) if outcome else (False, None)


def client_request_id(request: Request) -> str | None:
    """The client's ``X-Request-Id`` when it is a valid id (it names the request's trace), else None.
    Worker-facing request ids stay generated, so clients reusing an id never collide on a worker."""
    value = request.headers.get(REQUEST_ID_KEY)
    return value if valid_request_id(value) else None


class OpenAIHandlers:
    def __init__(
        self, config: RouterConfig, backend: GenerationBackend, tokenizer, metrics: RouterMetrics
    ) -> None:
        self.config = config
        self.backend = backend
        self.tokenizer = tokenizer
        self.metrics = metrics

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len or self.backend.model_info.max_model_len

    @property
    def limits(self) -> Limits:
        vocab = self.backend.model_info.vocab_size or self.tokenizer.vocab_size
        c = self.config
        return Limits(
            max_n=c.max_n, max_logprobs=c.max_logprobs, max_stop_strings=c.max_stop_strings, vocab_size=vocab
        )

    # -- tokenization -------------------------------------------------------------------------

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        plain = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                content = "\n".join(part.text or "" for part in content)
            entry = {**(m.model_extra or {}), "role": m.role, "content": content or ""}
            if m.name is not None:
                entry["name"] = m.name
            plain.append(entry)
        return await render_chat(self.tokenizer, plain, add_generation_prompt)

    async def encode_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            return [list(prompt)]
        if isinstance(prompt[0], list):
            return [list(p) for p in prompt]
        return await encode_texts(self.tokenizer, prompt)

    # -- endpoints ----------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest)
        check_model(req.model, self.config.served_model_name)
        check_chat(req, self.limits)
        prompt_ids = await self.render_chat(req.messages, req.add_generation_prompt)
        requested, param = (
            (req.max_completion_tokens, "max_completion_tokens")
            if req.max_completion_tokens is not None
            else (req.max_tokens, "max_tokens")
        )
        top = req.top_logprobs or 0
        sampling = self._sampling(req, logprobs=bool(req.logprobs), top_logprobs=top)
        specs = self._specs([prompt_ids], requested, param, sampling, req.n, client_request_id(request))
        formatter = ChatFormatter(
            self.config.served_model_name,
            len(specs),
            1,
            self._include_usage(req),
            logprobs=bool(req.logprobs),
        )
        return await self._serve(request, req, specs, formatter)

    async def completions(self, request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        check_model(req.model, self.config.served_model_name)
        check_completion(req, self.limits)
        prompts = await self.encode_prompts(req.prompt)
        if any(not p for p in prompts):
            raise invalid("`prompt` encodes to no tokens.", "prompt")
        k = req.logprobs
        sampling = self._sampling(req, logprobs=k is not None, top_logprobs=k or 0)
        specs = self._specs(
            prompts, req.max_tokens, "max_tokens", sampling, req.n, client_request_id(request)
        )
        echo = None
        if req.echo:
            echo = [self.tokenizer.decode(p, skip_special_tokens=req.skip_special_tokens) for p in prompts]
        formatter = CompletionFormatter(
            self.config.served_model_name,
            len(specs),
            len(prompts),
            self._include_usage(req),
            logprobs=k is not None,
            echo_texts=echo,
        )
        return await self._serve(request, req, specs, formatter)

    # -- shared -------------------------------------------------------------------------------

    @staticmethod
    def _include_usage(req: SamplingFields) -> bool:
        return bool(req.stream and req.stream_options and req.stream_options.include_usage)

    def _sampling(self, req: SamplingFields, *, logprobs: bool, top_logprobs: int) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=1,  # replaced per prompt once its length is known
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0,
            seed=req.seed,
            min_tokens=req.min_tokens or 0,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items()),
            logprobs=logprobs or top_logprobs > 0,
            top_logprobs=top_logprobs,
        )

    def _specs(
        self,
        prompts: list[list[int]],
        requested: int | None,
        param: str,
        sampling: SamplingOptions,
        n: int | None,
        trace_id: str | None,
    ) -> list[ChoiceSpec]:
        return build_specs(
            prompts,
            n or 1,
            sampling,
            requested_max_tokens=requested,
            max_tokens_param=param,
            max_model_len=self.max_model_len,
            default_max_tokens=self.config.default_max_tokens,
            trace_id=trace_id,
        )

    async def _serve(
        self, request: Request, req: SamplingFields, specs: list[ChoiceSpec], fmt: Formatter
    ) -> Response:
        opts = TextOptions(stop_strings(req.stop), req.include_stop_str_in_output, req.skip_special_tokens)
        tracker = self.metrics.track(specs[0].request.trace_id, len(specs))
        stream = generate_choices(
            self.backend, self.tokenizer, specs, opts, tracker, self.config.request_timeout_s
        )
        handed_over = False
        try:
            if req.stream:
                # Wait for the first delta before answering, so early failures get a real status code.
                done, first = await until_disconnect(request, stream.__anext__)
                if not done:
                    tracker.close("client_disconnected")
                    return Response(status_code=499)
                handed_over = True
                return SSEResponse(self._sse_events(first, stream, fmt, tracker))
            done, _ = await until_disconnect(request, lambda: self._collect(stream, fmt, tracker))
            if not done:
                tracker.close("client_disconnected")
                return Response(status_code=499)
            tracker.close()
            return JSONResponse(fmt.response())
        except RouterError as err:
            tracker.close(err.code or str(err.status))
            raise
        except StopAsyncIteration:
            tracker.close("internal")
            raise RouterError(500, "The generation ended without output.", code="internal") from None
        finally:
            if not handed_over:
                await stream.aclose()

    @staticmethod
    async def _collect(stream: AsyncIterator[ChoiceDelta], fmt: Formatter, tracker: RequestTracker) -> None:
        async for delta in stream:
            fmt.collect(delta)
            if delta.finish_reason is not None:
                tracker.on_choice_finished(delta.finish_reason)

    @staticmethod
    async def _sse_events(
        first: ChoiceDelta, stream: AsyncIterator[ChoiceDelta], fmt: Formatter, tracker: RequestTracker
    ) -> AsyncIterator[str]:
        error_code: str | None = "client_disconnected"
        try:
            delta: ChoiceDelta | None = first
            while delta is not None:
                for event in fmt.chunk(delta):
                    yield event
                if delta.finish_reason is not None:
                    tracker.on_choice_finished(delta.finish_reason)
                delta = await anext(stream, None)
            if fmt.include_usage:
                yield fmt.usage_chunk()
            error_code = None
        except RouterError as err:
            # Headers are gone: the error travels as a chunk, then the stream ends normally.
            error_code = err.code or str(err.status)
            yield fmt.error_chunk(err.to_dict())
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # type: ignore[attr-defined]
            tracker.close(error_code)
        yield SSE_DONE
