"""The OpenAI-compatible HTTP front end: ``create_app(config, backend, store, tokenizer)``.

No module globals: every piece of state hangs off the app built here. The app owns ``backend`` and
``store`` once created: its lifespan starts the backend and closes both on shutdown.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics, POST /tokenize, POST /detokenize, GET /version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from baton.tracing import TraceExporter
from router.backend import GenerationBackend
from router.config import RouterConfig
from router.errors import RouterError
from router.http_util import BodySizeLimit
from router.metrics import RouterMetrics
from router.openai_handlers import OpenAIHandlers, parse_body
from router.placement.base import PlacementStore
from router.protocol import DetokenizeRequest, TokenizeRequest
from router.validation import check_model

log = logging.getLogger(__name__)


def create_app(
    config: RouterConfig,
    backend: GenerationBackend,
    store: PlacementStore,
    tokenizer,
    tracer: TraceExporter | None = None,
) -> FastAPI:
    """``tracer`` defaults to OTLP export to ``config.otlp_endpoint`` (off when empty)."""
    if tracer is None:
        tracer = TraceExporter.from_endpoint(config.otlp_endpoint)
    metrics = RouterMetrics(config.served_model_name, tracer)
    handlers = OpenAIHandlers(config, backend, tokenizer, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.close()
            await store.close()
            tracer.shutdown()

    app = FastAPI(title="Baton router", version=config.version, lifespan=lifespan)
    app.state.metrics = metrics
    app.state.handlers = handlers

    @app.exception_handler(RouterError)
    async def router_error(_: Request, err: RouterError) -> JSONResponse:
        return JSONResponse(err.to_dict(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        body = RouterError(err.status_code, str(err.detail), code=None).to_dict()
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            RouterError(500, "Internal server error.", code="internal").to_dict(), status_code=500
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handlers.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handlers.completions(request)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "baton",
            "root": config.served_model_name,
            "max_model_len": handlers.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if backend.ready():
            return JSONResponse({"status": "ok"})
        return JSONResponse(
            {"status": "unavailable", "reason": "no worker can serve requests"}, status_code=503
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version() -> dict:
        return {"version": config.version}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        req = await parse_body(request, TokenizeRequest)
        check_model(req.model, config.served_model_name)
        if (req.prompt is None) == (req.messages is None):
            raise RouterError(
                400, "Give exactly one of `prompt` or `messages`.", param="prompt", code="invalid_value"
            )
        if req.messages is not None:
            if not req.messages:
                raise RouterError(
                    400, "`messages` must not be empty.", param="messages", code="invalid_value"
                )
            tokens = await handlers.render_chat(req.messages, req.add_generation_prompt)
        else:
            tokens = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": handlers.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        req = await parse_body(request, DetokenizeRequest)
        check_model(req.model, config.served_model_name)
        vocab = handlers.limits.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise RouterError(
                400,
                f"Token id {bad} is out of the vocabulary [0, {vocab}).",
                param="tokens",
                code="invalid_value",
            )
        return {"prompt": tokenizer.decode(req.tokens)}

    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    return app
