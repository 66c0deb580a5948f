"""Router errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the router reports (validation, unknown model, backend trouble) is a ``RouterError``;
the HTTP layer renders it with its status, the gRPC layer maps ``status`` to a status code. One place
decides the shape, so every endpoint answers errors the same way.
"""

from __future__ import annotations

from typing import Any


class RouterError(Exception):
    """A client-visible error. ``status`` is the HTTP status; ``param`` names the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"RouterError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def _default_type(status: int) -> str:
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def invalid(message: str, param: str | None, code: str = "invalid_value") -> RouterError:
    """A 400 about one request field."""
    return RouterError(400, message, param=param, code=code)


def model_not_found(model: str) -> RouterError:
    return RouterError(
        404,
        f"The model `{model}` does not exist.",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )
