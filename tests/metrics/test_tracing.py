"""baton.tracing: request ids on the wire, the trace line, and OTLP export to a real gRPC collector."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from baton.tracing import (
    RequestTrace,
    SequenceTiming,
    TraceExporter,
    request_id_from_metadata,
    request_id_metadata,
    valid_request_id,
)


@pytest.mark.parametrize("value", ["abc", "chatcmpl-1a2b", "a" * 128, "trace/7:x#1"])
def test_valid_request_ids(value: str) -> None:
    assert valid_request_id(value)
    assert request_id_from_metadata([("authorization", "x"), *request_id_metadata(value)]) == value


@pytest.mark.parametrize("value", ["", "a" * 129, "has space", "tab\t", "new\nline", "ünï"])
def test_invalid_request_ids_never_travel(value: str) -> None:
    assert not valid_request_id(value)
    assert request_id_metadata(value) == ()
    assert request_id_from_metadata([("x-request-id", value)]) == ""


def _split_trace() -> RequestTrace:
    trace = RequestTrace("req-7", received=100.0, received_wall_ns=1_700_000_000_000_000_000)
    timing = SequenceTiming(
        placed=100.001, reserved=100.003, prefill_done=100.030, prefill_ms=20.0, transfer_ms=12.5
    )
    trace.on_route("split", "prefill-0", "decode-0", timing)
    trace.on_route("local", None, "decode-1", None)  # a later sequence does not replace the first
    trace.first_token = 100.031
    trace.prompt_tokens, trace.output_tokens = 40, 5
    trace.finish(None, now=100.080)
    return trace


def test_summary_line_reports_every_phase() -> None:
    line = _split_trace().summary()
    assert line == (
        "request=req-7 status=ok route=split P=prefill-0 D=decode-0 queue_ms=3.0 ttft_ms=31.0 prefill_ms=20.0 "
        "transfer_ms=12.5 prompt_tokens=40 cached_tokens=0 tokens=5 e2e_ms=80.0"
    )
    failed = RequestTrace("req-8", received=5.0)
    failed.finish("timeout", now=6.0)
    assert failed.summary().startswith("request=req-8 status=timeout route=- P=- D=- queue_ms=- ttft_ms=-")


class _Collector:
    """A real OTLP/gRPC trace endpoint that keeps what it receives."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.requests: list = []
        self.received = threading.Event()
        collector = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                collector.requests.append(request)
                collector.received.set()
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def spans(self) -> list:
        return [
            (span, rs.resource)
            for req in self.requests
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]


def test_traces_reach_an_otlp_collector() -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    collector = _Collector()
    try:
        exporter = TraceExporter.from_endpoint(f"http://127.0.0.1:{collector.port}")
        assert exporter.enabled
        exporter.export(_split_trace())
        exporter.shutdown()  # flushes the batch
        assert collector.received.wait(10)
        spans = collector.spans()
        names = {span.name for span, _ in spans}
        assert names == {
            "baton.request",
            "baton.place",
            "baton.reserve",
            "baton.prefill",
            "baton.kv_transfer",
            "baton.decode",
        }
        assert len({span.trace_id for span, _ in spans}) == 1
        (root, resource) = next((s, r) for s, r in spans if s.name == "baton.request")
        assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "baton-router"
        attrs = {a.key: a.value for a in root.attributes}
        assert (
            attrs["baton.request_id"].string_value == "req-7" and attrs["baton.output_tokens"].int_value == 5
        )
        assert root.end_time_unix_nano - root.start_time_unix_nano == 80_000_000
        kv = next(s for s, _ in spans if s.name == "baton.kv_transfer")
        assert kv.end_time_unix_nano - kv.start_time_unix_nano == pytest.approx(12_500_000, abs=2)
    finally:
        collector.server.stop(0)


def test_tracing_is_off_without_an_endpoint() -> None:
    exporter = TraceExporter.from_endpoint("")
    assert not exporter.enabled
    exporter.export(_split_trace())  # a no-op
    exporter.shutdown()
