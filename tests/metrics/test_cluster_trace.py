"""Router -> prefill -> KV transfer -> decode with real worker processes (gloo, loopback gRPC):

- the router's trace line and its OpenTelemetry spans carry every phase of a request, and the prefill
  worker's own log line (found by the x-request-id it received) reports the same transfer time;
- ``/metrics`` on each worker and the router's cluster view expose the worker families with numbers
  that add up (tokens, transfers, bytes = blocks x block bytes).
"""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import pytest
import uvicorn

from baton.tracing import TraceExporter
from baton.worker_metrics import WORKER_FAMILIES
from router.app import create_app
from router.cluster_backend import ClusterBackend, ClusterConfig
from router.config import RouterConfig
from router.placement import EmbeddedPlacementStore, WorkerRole
from router.policy import CacheAwarePolicy
from router.registrar import WorkerRegistrar
from tests.metrics.families import families
from tests.metrics.harness import MetricsWorker, block_bytes, samples, trace_fields, worker_labels
from tests.workers.cluster import SECRET

otel_export = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")

MODEL = "dummy:tiny-llama"
BLOCK = 4
SPLIT_PROMPT = [(7 * i) % 300 + 5 for i in range(40)]  # 10 blocks, far above the local threshold
LOCAL_PROMPT = [11, 12, 13, 14, 15, 16]
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def workers():
    common = ["--block-size", str(BLOCK), "--num-kv-blocks", "256", "--log-level", "info"]
    d = MetricsWorker("decode", MODEL, *common)
    p = MetricsWorker("prefill", MODEL, *common, "--chunk", "16")
    yield p, d
    p.stop()
    d.stop()


@pytest.fixture(scope="module")
def tokenizer():
    from baton.text import Tokenizer
    from engine.model_source import resolve_model

    tokenizer_dir = resolve_model(None).tokenizer_dir  # the tiny shape shares SmolLM2's vocabulary
    return Tokenizer.from_dir(tokenizer_dir)


async def _run_requests(p: MetricsWorker, d: MetricsWorker, tokenizer, span_exporter) -> dict:
    info = d.info()
    store = EmbeddedPlacementStore()
    cluster = ClusterConfig(
        info.model_fingerprint,
        info.block_size,
        info.max_model_len,
        vocab_size=tokenizer.vocab_size,
        secret=SECRET,
    )
    backend = ClusterBackend(cluster, store, CacheAwarePolicy(local_prefill_threshold=16))
    tracer = TraceExporter(span_exporter, batch=False)
    app = create_app(RouterConfig("tiny"), backend, store, tokenizer, tracer=tracer)
    registrar = WorkerRegistrar(store, secret=SECRET, on_info=app.state.metrics.workers.observe)
    targets = [(d.address, WorkerRole.DECODE), (p.address, WorkerRole.PREFILL)]
    assert await registrar.poll_once(targets) == 2
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "uvicorn exited"
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        body = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60) as http:
            for request_id, prompt in (("trace-split-1", SPLIT_PROMPT), ("trace-local-1", LOCAL_PROMPT)):
                r = await http.post(
                    f"{url}/v1/completions",
                    json={**body, "prompt": prompt},
                    headers={"X-Request-Id": request_id},
                )
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
            assert await registrar.poll_once(targets) == 2  # fresh worker snapshots for the cluster view
            router_metrics = (await http.get(f"{url}/metrics")).text
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)
    return {"router_metrics": router_metrics, "layout": info.kv_layout}


@pytest.fixture(scope="module")
def run(workers, tokenizer):
    p, d = workers
    span_exporter = otel_export.InMemorySpanExporter()
    handler = _Capture()
    trace_log = logging.getLogger("router.trace")
    trace_log.addHandler(handler)
    level = trace_log.level
    trace_log.setLevel(logging.INFO)
    try:
        out = asyncio.run(_run_requests(p, d, tokenizer, span_exporter))
    finally:
        trace_log.removeHandler(handler)
        trace_log.setLevel(level)
    lines = {trace_fields(m)["request"]: trace_fields(m) for m in handler.messages}
    return {**out, "lines": lines, "spans": span_exporter.get_finished_spans(), "p": p, "d": d}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_trace_line_has_every_phase_of_a_split_request(run) -> None:
    line = run["lines"]["trace-split-1"]
    assert (line["status"], line["route"], line["P"], line["D"]) == ("ok", "split", "prefill-t", "decode-t")
    assert (line["tokens"], line["prompt_tokens"]) == (str(MAX_TOKENS), str(len(SPLIT_PROMPT)))
    queue, ttft, e2e = float(line["queue_ms"]), float(line["ttft_ms"]), float(line["e2e_ms"])
    prefill, transfer = float(line["prefill_ms"]), float(line["transfer_ms"])
    assert 0 <= queue <= ttft <= e2e
    assert 0 < prefill <= ttft and 0 <= transfer <= ttft
    # The prefill worker read the request's x-request-id and logged the same transfer time.
    worker_lines = [entry for entry in run["p"].log_lines if "(request trace-split-1)" in entry]
    assert len(worker_lines) == 1, run["p"].log_lines[-20:]
    assert f"transfer_ms={line['transfer_ms']}" in worker_lines[0]
    assert f"prefill_ms={line['prefill_ms']}" in worker_lines[0] and "blocks_sent=10" in worker_lines[0]


def test_trace_line_of_a_local_request(run) -> None:
    line = run["lines"]["trace-local-1"]
    assert (line["status"], line["route"], line["P"], line["D"]) == ("ok", "local", "-", "decode-t")
    assert (line["prefill_ms"], line["transfer_ms"]) == ("-", "-")
    assert float(line["queue_ms"]) <= float(line["ttft_ms"]) <= float(line["e2e_ms"])
    assert line["tokens"] == str(MAX_TOKENS)
    assert not any("(request trace-local-1)" in entry for entry in run["p"].log_lines)


def test_spans_form_one_trace_per_request(run) -> None:
    by_trace: dict[int, list] = {}
    for span in run["spans"]:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    assert len(by_trace) == 2
    traces = {}
    for spans in by_trace.values():
        (root,) = [s for s in spans if s.name == "baton.request"]
        traces[root.attributes["baton.request_id"]] = (root, {s.name: s for s in spans})
    root, split = traces["trace-split-1"]
    assert set(split) == {
        "baton.request",
        "baton.place",
        "baton.reserve",
        "baton.prefill",
        "baton.kv_transfer",
        "baton.decode",
    }
    for name in ("baton.place", "baton.reserve", "baton.prefill", "baton.decode"):
        assert split[name].parent.span_id == root.context.span_id
        assert root.start_time <= split[name].start_time <= split[name].end_time <= root.end_time
    assert split["baton.kv_transfer"].parent.span_id == split["baton.prefill"].context.span_id
    transfer_ms = split["baton.prefill"].attributes["baton.transfer_ms"]
    kv = split["baton.kv_transfer"]
    assert (kv.end_time - kv.start_time) / 1e6 == pytest.approx(transfer_ms, abs=0.01)
    assert kv.end_time == split["baton.prefill"].end_time == split["baton.decode"].start_time
    assert [e.name for e in split["baton.decode"].events] == ["first_token"]
    assert root.attributes["baton.route"] == "split" and root.attributes["baton.output_tokens"] == MAX_TOKENS
    root, local = traces["trace-local-1"]
    assert set(local) == {"baton.request", "baton.place", "baton.reserve", "baton.decode"}
    assert (
        root.attributes["baton.prefill_worker"] == "" and root.attributes["baton.decode_worker"] == "decode-t"
    )


def test_router_metrics_show_requests_and_the_cluster(run) -> None:
    s = samples(run["router_metrics"])
    assert s[("baton:routing_decisions_total", (("decision", "split"),))] == 1
    assert s[("baton:routing_decisions_total", (("decision", "local"),))] == 1
    for name in (
        "time_to_first_token",
        "request_queue_time",
        "request_time_per_output_token",
        "e2e_request_latency",
    ):
        assert s[(f"baton:{name}_seconds_count", ())] == 2, name
    moved = 10 * block_bytes(run["layout"])  # the decode worker had nothing cached: all 10 blocks moved
    pre, dec = worker_labels("prefill-t", "prefill"), worker_labels("decode-t", "decode")
    for labels in (pre, dec):
        assert s[("baton:kv_transfer_time_seconds_count", labels)] == 1
        assert s[("baton:kv_transfer_bytes_total", labels)] == moved
        assert s[("baton:kv_transfer_failures_total", labels)] == 0
        assert s[("baton:num_requests_running", labels)] == 0
        # P first-scheduled the split request, D the local one (KV from P is never queued for prefill).
        assert s[("baton:request_queue_time_seconds_count", labels)] == 1
        assert s[("baton:spec_decode_num_drafts_total", labels)] == 0
    # The router's totals are the sum of the workers' shares.
    assert s[("baton:generation_tokens_total", ())] == 2 * MAX_TOKENS
    assert s[("baton:generation_tokens_total", pre)] == 1  # P samples the first token of the split one
    assert s[("baton:generation_tokens_total", dec)] == 2 * MAX_TOKENS - 1
    assert s[("baton:prompt_tokens_total", ())] == len(SPLIT_PROMPT) + len(LOCAL_PROMPT)
    assert s[("baton:prompt_tokens_total", pre)] == len(SPLIT_PROMPT)
    assert s[("baton:prompt_tokens_total", dec)] == len(LOCAL_PROMPT)
    assert s[("baton:prefix_cache_queries_total", pre)] >= len(SPLIT_PROMPT)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_metrics_endpoint_matches_the_router_view(run, role: str) -> None:
    worker = run["p"] if role == "prefill" else run["d"]
    text = worker.scrape()
    assert set(WORKER_FAMILIES) <= set(families(text))
    own, router = samples(text), samples(run["router_metrics"])
    labels = worker_labels(f"{role}-t", role)
    for name in (
        "baton:kv_transfer_bytes_total",
        "baton:generation_tokens_total",
        "baton:prompt_tokens_total",
        "baton:prefix_cache_hits_total",
    ):
        assert own[(name, labels)] == router[(name, labels)], name
    assert re.fullmatch(r"127\.0\.0\.1:\d+", worker.metrics_address)
