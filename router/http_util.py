"""ASGI pieces of the HTTP front end: a request-body size limit and an SSE response that notices
client disconnects.

Both are plain ASGI so they see the raw byte stream and the ``http.disconnect`` message directly,
instead of relying on when a framework happens to look.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import Response

from router.errors import RouterError

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """Rejects request bodies over ``max_bytes`` with 413 before the app reads them.

    A declared ``Content-Length`` over the limit is refused without reading; otherwise the body is
    read here, counting bytes as they arrive (chunked uploads have no length), and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await send_json(send, 400, _error(400, "Invalid Content-Length header.", "invalid_header"))
                return
            if too_big:
                await send_json(send, 413, self._too_large())
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_json(send, 413, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)

    def _too_large(self) -> dict[str, Any]:
        return _error(413, f"Request body exceeds the limit of {self.max_bytes} bytes.", "request_too_large")


def _error(status: int, message: str, code: str) -> dict[str, Any]:
    return RouterError(status, message, code=code).to_dict()


class SSEResponse(Response):
    """Streams server-sent events; on client disconnect cancels the producer (whose ``finally``
    aborts the workers) instead of waiting for the next write to fail."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                log.info("client disconnected; cancelling the stream")
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                log.info("client connection lost while streaming")
            finally:
                with anyio.CancelScope(shield=True):
                    await self.events.aclose()  # type: ignore[attr-defined]
                tg.cancel_scope.cancel()
