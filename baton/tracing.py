"""Request tracing: one trace per client request, across router -> prefill -> KV transfer -> decode.

1. The router names every client request (its ``X-Request-Id`` header or gRPC ``request_id`` when
   valid, else a fresh id) and sends that name to the workers in gRPC metadata ``x-request-id`` on
   Reserve, Prefill, Decode and Abort. Workers read it (``request_id_from_metadata``) for their own log
   lines, so a worker's transfer timing can be found from the router's line and back.
2. The router records phase marks in a ``RequestTrace``: received, placed (workers chosen), reserved
   (decode worker holds blocks), prefill done (split only), first token, done. The prefill worker
   reports its share in ``PrefillResult`` (``prefill_ms``: admitted -> first token sampled;
   ``transfer_ms``: first KV piece sent -> every block acknowledged).
3. When the request ends the router logs one line (``RequestTrace.summary()``) and, when an OTLP
   endpoint is configured (``BATON_OTLP_ENDPOINT``) and OpenTelemetry is importable, exports the
   trace as spans (``TraceExporter``)::

       baton.request                       received -> done
         baton.place                       received -> placed
         baton.reserve                     placed -> reserved
         baton.prefill                     reserved -> prefill done   (split)
           baton.kv_transfer               its last transfer_ms
         baton.decode                      reserved or prefill done -> done (event: first_token)

Marks are ``time.monotonic()`` seconds of the router process; spans get wall-clock times from the
``received`` anchor. This module stays torch-free (the router imports it).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlparse

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:#/+=@-]{1,128}")


def valid_request_id(value: str | None) -> bool:
    """Ids we accept from clients and peers: 1-128 printable characters, no spaces."""
    return bool(value) and _VALID_ID.fullmatch(value) is not None


def request_id_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_KEY, request_id),) if valid_request_id(request_id) else ()


def request_id_from_metadata(metadata: Iterable[tuple[str, str]] | None) -> str:
    """The ``x-request-id`` of a gRPC call's metadata; "" when absent or malformed."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and valid_request_id(value):
            return value
    return ""


@dataclass
class SequenceTiming:
    """Where one sequence's time went before its first token (monotonic seconds of the router).

    In a split the first token streams before the KV transfer ends, so the router fills
    ``prefill_done`` and ``transfer_ms`` into the same object later (the trace holds it by reference
    and reads it when the request ends).
    """

    placed: float
    reserved: float
    prefill_done: float | None = None  # split only: Prefill returned (every KV block acknowledged)
    prefill_ms: float | None = None  # reported by the prefill worker
    transfer_ms: float | None = None  # reported by the prefill worker
    attempts: int = 1  # placements tried (retries after worker failures)


@dataclass
class RequestTrace:
    """Phase marks of one client request. With several sequences (n > 1, batched prompts) the route
    and timing are those of the first sequence to start streaming."""

    request_id: str
    received: float = field(default_factory=time.monotonic)
    received_wall_ns: int = field(default_factory=time.time_ns)
    route: str | None = None  # "split" | "local"
    prefill_worker: str | None = None
    decode_worker: str | None = None
    timing: SequenceTiming | None = None
    first_token: float | None = None
    done: float | None = None
    num_sequences: int = 1
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    status: str = "ok"  # or the error code the request ended with

    def on_route(
        self, decision: str, prefill_worker: str | None, decode_worker: str, timing: SequenceTiming | None
    ) -> None:
        if self.route is None:
            self.route, self.prefill_worker, self.decode_worker = decision, prefill_worker, decode_worker
            self.timing = timing

    def finish(self, status: str | None, now: float | None = None) -> None:
        self.done = time.monotonic() if now is None else now
        self.status = status or "ok"

    def ms(self, since: float | None, until: float | None) -> float | None:
        if since is None or until is None:
            return None
        return (until - since) * 1000

    def summary(self) -> str:
        """One log line: id, outcome, route, workers, and where the time went (ms)."""
        t = self.timing
        fields = {
            "request": self.request_id,
            "status": self.status,
            "route": self.route or "-",
            "P": self.prefill_worker or "-",
            "D": self.decode_worker or "-",
            "queue_ms": self.ms(self.received, t.reserved if t else None),
            "ttft_ms": self.ms(self.received, self.first_token),
            "prefill_ms": t.prefill_ms if t else None,
            "transfer_ms": t.transfer_ms if t else None,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "tokens": self.output_tokens,
            "e2e_ms": self.ms(self.received, self.done),
        }
        if t is not None and t.attempts > 1:
            fields["attempts"] = t.attempts
        if self.num_sequences > 1:
            fields["n"] = self.num_sequences
        return " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


class TraceExporter:
    """Exports finished ``RequestTrace``s as OpenTelemetry spans; a no-op when built without an
    exporter. Owns a private tracer provider (never the process-global one)."""

    def __init__(self, span_exporter=None, service_name: str = "baton-router", batch: bool = True) -> None:
        self._provider = None
        if span_exporter is None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        processor = BatchSpanProcessor(span_exporter) if batch else SimpleSpanProcessor(span_exporter)
        provider.add_span_processor(processor)
        self._provider = provider
        self._tracer = provider.get_tracer("baton")

    @classmethod
    def from_endpoint(cls, endpoint: str, service_name: str = "baton-router") -> TraceExporter:
        """OTLP to ``endpoint`` (``http://host:4317`` gRPC; a URL ending in ``/v1/traces``: HTTP).
        Empty endpoint, or OpenTelemetry's SDK / OTLP exporter not installed: tracing off (logged)."""
        if not endpoint:
            return cls()
        try:
            if urlparse(endpoint).path.rstrip("/").endswith("/v1/traces"):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            return cls(OTLPSpanExporter(endpoint=endpoint), service_name)
        except ImportError as err:
            log.warning(
                "BATON_OTLP_ENDPOINT=%s but OpenTelemetry is not installed (%s): tracing off", endpoint, err
            )
            return cls()

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def export(self, trace: RequestTrace) -> None:
        if self._provider is None or trace.done is None:
            return
        from opentelemetry import trace as otel
        from opentelemetry.trace import SpanKind, Status, StatusCode

        def ns(mark: float) -> int:
            return trace.received_wall_ns + round((mark - trace.received) * 1e9)

        attrs = {
            "baton.request_id": trace.request_id,
            "baton.route": trace.route or "",
            "baton.prefill_worker": trace.prefill_worker or "",
            "baton.decode_worker": trace.decode_worker or "",
            "baton.prompt_tokens": trace.prompt_tokens,
            "baton.cached_tokens": trace.cached_tokens,
            "baton.output_tokens": trace.output_tokens,
            "baton.status": trace.status,
        }
        root = self._tracer.start_span(
            "baton.request", kind=SpanKind.SERVER, start_time=ns(trace.received), attributes=attrs
        )
        if trace.status != "ok":
            root.set_status(Status(StatusCode.ERROR, trace.status))
        parent = otel.set_span_in_context(root)

        def child(name: str, start: float, end: float, context=parent, attributes=None) -> None:
            span = self._tracer.start_span(name, context=context, start_time=ns(start), attributes=attributes)
            span.end(end_time=ns(max(start, end)))

        t = trace.timing
        if t is not None:
            child("baton.place", trace.received, t.placed)
            child(
                "baton.reserve",
                t.placed,
                t.reserved,
                attributes={"baton.decode_worker": trace.decode_worker or ""},
            )
            decode_from = t.reserved
            if t.prefill_done is not None:
                prefill = self._tracer.start_span(
                    "baton.prefill",
                    context=parent,
                    start_time=ns(t.reserved),
                    attributes={
                        "baton.prefill_worker": trace.prefill_worker or "",
                        "baton.prefill_ms": t.prefill_ms or 0.0,
                        "baton.transfer_ms": t.transfer_ms or 0.0,
                    },
                )
                if t.transfer_ms:
                    # The transfer ends when Prefill returns; its start is placed from the worker's duration.
                    start = max(t.reserved, t.prefill_done - t.transfer_ms / 1000)
                    child("baton.kv_transfer", start, t.prefill_done, otel.set_span_in_context(prefill))
                prefill.end(end_time=ns(t.prefill_done))
                decode_from = t.prefill_done
            decode = self._tracer.start_span(
                "baton.decode",
                context=parent,
                start_time=ns(decode_from),
                attributes={"baton.decode_worker": trace.decode_worker or ""},
            )
            if trace.first_token is not None:
                decode.add_event("first_token", timestamp=ns(trace.first_token))
            decode.end(end_time=ns(max(decode_from, trace.done)))
        root.end(end_time=ns(trace.done))

    def shutdown(self) -> None:
        """Flush pending spans (bounded by the SDK's own timeouts)."""
        if self._provider is not None:
            self._provider.shutdown()
