"""Prometheus metrics of one router, and the per-request trace (own registry per app, so tests and
replicas in one process never share counters). Names follow vLLM's with the ``baton:`` prefix so
dashboards port 1:1.

Router families (label ``model_name``): ``baton:time_to_first_token_seconds``,
``baton:inter_token_latency_seconds``, ``baton:request_time_per_output_token_seconds``,
``baton:e2e_request_latency_seconds``, ``baton:request_queue_time_seconds`` (received -> a decode
worker reserved blocks), ``baton:request_success_total``, ``baton:request_failure_total``,
``baton:prompt_tokens_total``, ``baton:prompt_tokens_cached_total``, ``baton:generation_tokens_total``,
``baton:num_requests_running`` / ``baton:num_requests_waiting`` (in flight, after / before their first
token), ``baton:routing_decisions_total{decision="split"|"local"}``.

Cluster view: the worker snapshots the registrar polls (``WorkerSnapshots.observe``) are exposed too,
with the worker families of ``baton.worker_metrics`` (labels ``worker_id`` and ``role`` added), so one
scrape of the router shows the whole cluster. Where a worker family shares a router name (running,
waiting, prompt / generation tokens, queue time) both live in one family: router series have no
``worker_id`` label, worker series have one. Select ``{worker_id=""}`` for the router's view.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric

from baton.tracing import RequestTrace, SequenceTiming, TraceExporter
from baton.v1 import common_pb2
from baton.worker_metrics import worker_families
from router.backend import Route

trace_log = logging.getLogger("router.trace")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)  # fmt: skip


class WorkerSnapshots:
    """The latest ``WorkerInfo`` of every worker, as polled; a snapshot older than ``stale_after_s``
    is dropped (the worker stopped answering or left), so its series disappear from the scrape."""

    def __init__(self, stale_after_s: float = 15.0) -> None:
        self.stale_after_s = stale_after_s
        self._latest: dict[str, tuple[common_pb2.WorkerInfo, float]] = {}
        self._lock = threading.Lock()

    def observe(self, info: common_pb2.WorkerInfo) -> None:
        if not info.worker_id:
            return
        with self._lock:
            self._latest[info.worker_id] = (info, time.monotonic())

    def forget(self, worker_id: str) -> None:
        with self._lock:
            self._latest.pop(worker_id, None)

    def current(self) -> list[common_pb2.WorkerInfo]:
        cutoff = time.monotonic() - self.stale_after_s
        with self._lock:
            for worker_id in [w for w, (_, seen) in self._latest.items() if seen < cutoff]:
                del self._latest[worker_id]
            return [info for info, _ in sorted(self._latest.values(), key=lambda e: e[0].worker_id)]


class _RouterCollector:
    """The router's own families, with the workers' samples merged into families of the same name."""

    def __init__(self, own: CollectorRegistry, workers: WorkerSnapshots) -> None:
        self._own = own
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        cluster = {family.name: family for family in worker_families(self._workers.current())}
        for family in self._own.collect():
            extra = cluster.pop(family.name, None)
            if extra is not None and extra.type == family.type:
                family.samples.extend(extra.samples)
            yield family
        yield from cluster.values()


class RouterMetrics:
    def __init__(
        self, model_name: str, tracer: TraceExporter | None = None, worker_stale_after_s: float = 15.0
    ) -> None:
        self.model_name = model_name
        self.tracer = tracer if tracer is not None else TraceExporter()
        self.workers = WorkerSnapshots(worker_stale_after_s)
        labels = ["model_name"]
        r = self._own = CollectorRegistry()
        self.ttft = Histogram(
            "baton:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "baton:inter_token_latency_seconds",
            "Time between tokens.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "baton:request_time_per_output_token_seconds",
            "Per sequence: (last token - first token) / (tokens - 1).",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "baton:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "baton:request_queue_time_seconds",
            "Router (no worker_id): received -> a decode worker reserved blocks for it. "
            "Workers: admitted -> first scheduled by the engine.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            "baton:request_success", "Finished requests.", [*labels, "finished_reason"], registry=r
        )
        self.failure = Counter("baton:request_failure", "Failed requests.", [*labels, "code"], registry=r)
        self.prompt_tokens = Counter(
            "baton:prompt_tokens",
            "Prompt tokens (router: of every request; workers: of the requests they prefilled).",
            labels,
            registry=r,
        )
        self.cached_prompt_tokens = Counter(
            "baton:prompt_tokens_cached", "Prompt tokens served from a prefix cache.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "baton:generation_tokens",
            "Generated tokens (router: streamed to clients; workers: sampled by them).",
            labels,
            registry=r,
        )
        self.running = Gauge(
            "baton:num_requests_running",
            "Router: requests streaming tokens. Workers: requests in their running batch.",
            labels,
            registry=r,
        )
        self.waiting = Gauge(
            "baton:num_requests_waiting",
            "Router: requests waiting for their first token. Workers: requests queued in their engine.",
            labels,
            registry=r,
        )
        self.routing = Counter(
            "baton:routing_decisions",
            "Placement decisions (split P/D or local prefill on D).",
            [*labels, "decision"],
            registry=r,
        )
        for decision in ("split", "local"):
            self.routing.labels(model_name, decision)
        for always in (
            self.running,
            self.waiting,
            self.prompt_tokens,
            self.cached_prompt_tokens,
            self.generation_tokens,
        ):
            always.labels(model_name)  # router series exist (at 0) from the start, beside the workers' ones
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RouterCollector(self._own, self.workers))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, request_id: str = "", num_sequences: int = 1) -> RequestTracker:
        return RequestTracker(self, request_id, num_sequences)


class RequestTracker:
    """Timing and trace of one request (all of its choices). ``close()`` must run exactly once, in a
    finally: it records the latencies, logs the request's trace line and exports its spans."""

    def __init__(self, metrics: RouterMetrics, request_id: str = "", num_sequences: int = 1) -> None:
        self._m = metrics
        self._label = metrics.model_name
        self.trace = RequestTrace(request_id or "-", num_sequences=num_sequences)
        self._start = self.trace.received
        self._first_token: dict[int, float] = {}
        self._last_token: dict[int, float] = {}
        self._num_tokens: dict[int, int] = {}
        self._first_seen = False
        self._closed = False
        metrics.waiting.labels(self._label).inc()

    def on_route(self, route: Route, timing: SequenceTiming | None = None) -> None:
        """A sequence was placed (its first event); the first one also places the request's trace."""
        self._m.routing.labels(self._label, route.decision).inc()
        first = self.trace.route is None
        self.trace.on_route(route.decision, route.prefill_worker, route.decode_worker, timing)
        if first and timing is not None:
            self._m.queue_time.labels(self._label).observe(timing.reserved - self._start)

    def on_tokens(self, choice_index: int, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if not self._first_seen:
            self._first_seen = True
            self.trace.first_token = now
            self._m.ttft.labels(self._label).observe(now - self._start)
            self._m.waiting.labels(self._label).dec()
            self._m.running.labels(self._label).inc()
        previous = self._last_token.get(choice_index)
        if previous is not None:
            self._m.itl.labels(self._label).observe((now - previous) / count)
        else:
            self._first_token[choice_index] = now
        self._last_token[choice_index] = now
        self._num_tokens[choice_index] = self._num_tokens.get(choice_index, 0) + count
        self.trace.output_tokens += count
        self._m.generation_tokens.labels(self._label).inc(count)

    def on_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.trace.prompt_tokens += prompt_tokens
        self.trace.cached_tokens += cached_tokens
        self._m.prompt_tokens.labels(self._label).inc(prompt_tokens)
        self._m.cached_prompt_tokens.labels(self._label).inc(cached_tokens)

    def on_choice_finished(self, finished_reason: str) -> None:
        self._m.success.labels(self._label, finished_reason).inc()

    def close(self, error_code: str | None = None) -> None:
        """End of the request: success (``error_code`` None) or failure with a short code."""
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        (self._m.running if self._first_seen else self._m.waiting).labels(self._label).dec()
        if error_code is not None:
            self._m.failure.labels(self._label, error_code).inc()
        else:
            self._m.e2e.labels(self._label).observe(now - self._start)
            for index, n in self._num_tokens.items():
                if n > 1:
                    decode_s = self._last_token[index] - self._first_token[index]
                    self._m.tpot.labels(self._label).observe(decode_s / (n - 1))
        self.trace.finish(error_code, now)
        trace_log.info("%s", self.trace.summary())
        try:
            self._m.tracer.export(self.trace)
        except Exception:  # tracing must never fail a request
            trace_log.exception("exporting the trace of %s failed", self.trace.request_id)
