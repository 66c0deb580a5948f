"""The router's public gRPC API (``baton.v1.RouterService``) plus standard health and reflection.

The servicer only translates: proto in -> the same validation, prompt preparation and generation
pipeline the HTTP front end uses -> proto out. ``RouterError`` maps to a gRPC status in one place
(``_STATUS``). Health is NOT_SERVING until the backend reports a worker that can serve; ``Check``
asks the backend at the moment of the call (so it agrees with HTTP ``/health``), ``Watch`` streams
the state a poller refreshes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.tracing import valid_request_id
from baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.backend import FinishReason, GenerationBackend, SamplingOptions
from router.config import RouterConfig
from router.errors import RouterError, invalid
from router.generation import ChoiceDelta, TextOptions, generate_choices
from router.metrics import RouterMetrics
from router.prompts import build_specs, encode_texts, render_chat
from router.protocol import SamplingFields
from router.validation import Limits, check_model, check_sampling
from router.wire import sampling_from_proto

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_ERROR_CODE = {
    400: common_pb2.ERROR_CODE_INVALID_ARGUMENT,
    404: common_pb2.ERROR_CODE_NOT_FOUND,
    429: common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED,
    503: common_pb2.ERROR_CODE_UNAVAILABLE,
    504: common_pb2.ERROR_CODE_DEADLINE_EXCEEDED,
}
_FINISH = {
    FinishReason.STOP.value: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH.value: common_pb2.FINISH_REASON_LENGTH,
}


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
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
        c = self.config
        vocab = self.backend.model_info.vocab_size or self.tokenizer.vocab_size
        return Limits(
            max_n=c.max_n, max_logprobs=c.max_logprobs, max_stop_strings=c.max_stop_strings, vocab_size=vocab
        )

    async def _prompt_ids(
        self, request: router_pb2.GenerateRequest | router_pb2.TokenizeRequest
    ) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "text":
            if not request.text:
                raise invalid("`text` must not be empty.", "text")
            add_special = not getattr(request, "skip_special_tokens", False)
            [ids] = await encode_texts(self.tokenizer, [request.text], add_special_tokens=add_special)
            return ids
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            vocab = self.limits.vocab_size
            if not ids or any(not 0 <= t < vocab for t in ids):
                raise invalid(f"`token_ids` must be non-empty ids in [0, {vocab}).", "token_ids")
            return ids
        if kind == "chat":
            if not request.chat.messages:
                raise invalid("`chat.messages` must contain at least one message.", "messages")
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            return await render_chat(self.tokenizer, messages)
        raise invalid("Give one of `text`, `token_ids` or `chat`.", "input")

    def _sampling(self, request: router_pb2.GenerateRequest) -> tuple[SamplingOptions, int, int | None]:
        s = request.sampling
        fields = SamplingFields(
            temperature=s.temperature if s.HasField("temperature") else None,
            top_p=s.top_p if s.HasField("top_p") else None,
            top_k=s.top_k,
            min_p=s.min_p,
            n=s.n if s.HasField("n") else None,
            seed=s.seed if s.HasField("seed") else None,
            max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
            min_tokens=s.min_tokens,
            stop=list(request.stop) or None,
            stop_token_ids=list(s.stop_token_ids),
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
            logit_bias={str(k): v for k, v in s.logit_bias.items()},
        )
        limits = self.limits
        check_sampling(fields, limits)
        if not 0 <= s.top_logprobs <= limits.max_logprobs:
            raise invalid(f"`top_logprobs` must be in [0, {limits.max_logprobs}].", "top_logprobs")
        return sampling_from_proto(s, default_max_tokens=1), fields.n or 1, fields.max_tokens

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        rid = request.request_id or None
        try:
            check_model(request.model or None, self.config.served_model_name)
            sampling, n, requested_max = self._sampling(request)
            prompt_ids = await self._prompt_ids(request)
            specs = build_specs(
                [prompt_ids],
                n,
                sampling,
                requested_max_tokens=requested_max,
                max_tokens_param="max_tokens",
                max_model_len=self.max_model_len,
                default_max_tokens=self.config.default_max_tokens,
                trace_id=rid if valid_request_id(rid) else None,
            )
        except RouterError as err:
            await context.abort(_STATUS.get(err.status, grpc.StatusCode.INTERNAL), _describe(err))
        # Worker-facing ids stay unique even when clients reuse theirs; the client's id is echoed.
        rid = rid or specs[0].request.request_id.rsplit("-", 1)[0]
        opts = TextOptions(
            tuple(request.stop), request.include_stop_str_in_output, not request.keep_special_tokens
        )
        tracker = self.metrics.track(specs[0].request.trace_id, len(specs))
        stream = generate_choices(
            self.backend, self.tokenizer, specs, opts, tracker, self.config.request_timeout_s
        )
        counts = [0] * len(specs)
        sent_any = False
        error_code: str | None = "cancelled"
        try:
            async for delta in stream:
                counts[delta.index] += len(delta.token_ids)
                for response in _responses(rid, delta, counts[delta.index], len(prompt_ids)):
                    sent_any = True
                    yield response
                if delta.finish_reason is not None:
                    tracker.on_choice_finished(delta.finish_reason)
            error_code = None
        except RouterError as err:
            error_code = err.code or str(err.status)
            if not sent_any:
                await context.abort(_STATUS.get(err.status, grpc.StatusCode.INTERNAL), _describe(err))
            code = _ERROR_CODE.get(err.status, common_pb2.ERROR_CODE_INTERNAL)
            yield router_pb2.GenerateResponse(
                request_id=rid, error=common_pb2.Error(code=code, message=err.message)
            )
        finally:
            await stream.aclose()
            tracker.close(error_code)

    async def Tokenize(
        self, request: router_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.TokenizeResponse:
        try:
            check_model(request.model or None, self.config.served_model_name)
            ids = await self._prompt_ids(request)
        except RouterError as err:
            await context.abort(_STATUS.get(err.status, grpc.StatusCode.INTERNAL), _describe(err))
        return router_pb2.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=self.max_model_len)

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        card = router_pb2.ModelCard(
            id=self.config.served_model_name, max_model_len=self.max_model_len, owned_by="baton"
        )
        return router_pb2.ListModelsResponse(models=[card])


def _describe(err: RouterError) -> str:
    return f"{err.message} (param: {err.param})" if err.param else err.message


def _responses(
    rid: str, delta: ChoiceDelta, num_completion: int, num_prompt: int
) -> list[router_pb2.GenerateResponse]:
    out = []
    if delta.token_ids or delta.text:
        chunk = router_pb2.GenerateChunk(index=delta.index, token_ids=delta.token_ids, text=delta.text)
        for entry in delta.logprobs:
            chunk.logprobs.add(token_id=entry.token_id, logprob=entry.logprob)
            if entry.top:
                chunk.top_logprobs.add().entries.extend(
                    common_pb2.TokenLogprob(token_id=tid, logprob=lp) for tid, _, lp in entry.top
                )
        out.append(router_pb2.GenerateResponse(request_id=rid, chunk=chunk))
    if delta.finish_reason is not None:
        complete = router_pb2.GenerateComplete(
            index=delta.index,
            finish_reason=_FINISH[delta.finish_reason],
            num_prompt_tokens=num_prompt,
            num_completion_tokens=num_completion,
        )
        if isinstance(delta.stop_reason, str):
            complete.stop_string = delta.stop_reason
        elif isinstance(delta.stop_reason, int):
            complete.stop_token_id = delta.stop_reason
        out.append(router_pb2.GenerateResponse(request_id=rid, complete=complete))
    return out


class _LiveHealthServicer(health.aio.HealthServicer):
    """``Check`` refreshes the status from ``refresh`` first; a poll alone would lag up to its period."""

    def __init__(self, refresh) -> None:
        super().__init__()
        self._refresh = refresh

    async def Check(self, request, context):  # noqa: N802 - the gRPC method's name
        await self._refresh()
        return await super().Check(request, context)


class RouterGrpcServer:
    """A running gRPC server: RouterService + grpc.health.v1 + reflection on ``address``."""

    def __init__(
        self, servicer: RouterServicer, backend: GenerationBackend, poll_interval_s: float = 0.5
    ) -> None:
        self._server = grpc.aio.server()
        self._backend = backend
        self._poll_interval_s = poll_interval_s
        self.health = _LiveHealthServicer(self._update_health)
        router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self._server)
        self._watcher: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, address: str = "127.0.0.1:0") -> int:
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind the gRPC server to {address}")
        await self._update_health()
        await self._server.start()
        self._watcher = asyncio.create_task(self._watch_health())
        return self.port

    async def _update_health(self) -> None:
        serving = self._backend.ready()
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                await self._update_health()
            except Exception:
                log.exception("health update failed")

    async def stop(self, grace_s: float = 2.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)


def create_grpc_server(
    config: RouterConfig,
    backend: GenerationBackend,
    tokenizer,
    metrics: RouterMetrics,
    poll_interval_s: float = 0.5,
) -> RouterGrpcServer:
    """The caller starts/closes ``backend`` (the HTTP app's lifespan does when both run together)."""
    return RouterGrpcServer(RouterServicer(config, backend, tokenizer, metrics), backend, poll_interval_s)
