"""Shared-secret authentication for Baton's internal gRPC listeners (workers).

Clients send ``authorization: Bearer <token>`` where the token is an HMAC-SHA256 of a fixed label
under the shared secret (so the secret itself never travels); servers compare in constant time and
answer UNAUTHENTICATED otherwise. Health checks (grpc.health.v1) stay open for Kubernetes probes.
"""

from __future__ import annotations

import hashlib
import hmac

import grpc

_LABEL = b"baton-grpc-v1"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def token_for(secret: str) -> str:
    return hmac.new(secret.encode("utf-8"), _LABEL, hashlib.sha256).hexdigest()


def auth_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """Metadata a client attaches to every call (empty when no secret is configured)."""
    return (("authorization", f"Bearer {token_for(secret)}"),) if secret else ()


class SecretAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the right token before they reach a servicer."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("SecretAuthInterceptor needs a non-empty secret")
        self._expected = f"Bearer {token_for(secret)}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong shared-secret token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_PREFIXES):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary


class _AioAuthBase:
    def __init__(self, secret: str) -> None:
        self._md = auth_metadata(secret)

    def _with_token(self, details):
        md = grpc.aio.Metadata(*tuple(details.metadata or ()), *self._md)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, md, details.credentials, details.wait_for_ready)


# grpc.aio files each interceptor under one call kind only, so each kind gets its own class.
class _AioAuthUnary(_AioAuthBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class _AioAuthStream(_AioAuthBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


def aio_channel(address: str, secret: str) -> grpc.aio.Channel:
    """An asyncio channel whose calls carry the shared-secret token (none when ``secret`` is empty)."""
    interceptors = [_AioAuthUnary(secret), _AioAuthStream(secret)] if secret else None
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


def add_standard_health(server: grpc.Server, service_name: str) -> None:
    """Register grpc.health.v1 (what Kubernetes gRPC probes call), SERVING for "" and ``service_name``.

    The servicer ships in ``grpcio-health-checking``; where its generated code does not load against
    the installed protobuf runtime, the worker still serves (its own HealthCheck RPC stays) and says so.
    """
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except Exception as e:  # version skew between grpcio-health-checking and protobuf
        import logging

        logging.getLogger(__name__).error("grpc.health.v1 unavailable (%s); Kubernetes gRPC probes will fail", e)
        return
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", service_name):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
