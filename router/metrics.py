"""Prometheus metrics of one router (own ``CollectorRegistry`` per app, so tests and replicas in one
process never share counters). Names follow vLLM's with the ``baton:`` prefix so dashboards port 1:1.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)


class RouterMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry
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
        self.e2e = Histogram(
            "baton:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            "baton:request_success", "Finished requests.", [*labels, "finished_reason"], registry=r
        )
        self.failure = Counter("baton:request_failure", "Failed requests.", [*labels, "code"], registry=r)
        self.prompt_tokens = Counter("baton:prompt_tokens", "Prefill tokens processed.", labels, registry=r)
        self.cached_prompt_tokens = Counter(
            "baton:prompt_tokens_cached", "Prompt tokens served from a prefix cache.", labels, registry=r
        )
        self.generation_tokens = Counter("baton:generation_tokens", "Generated tokens.", labels, registry=r)
        self.running = Gauge("baton:num_requests_running", "Requests streaming tokens.", labels, registry=r)
        self.waiting = Gauge(
            "baton:num_requests_waiting", "Requests waiting for their first token.", labels, registry=r
        )
        self.routing = Counter(
            "baton:routing_decisions",
            "Placement decisions (split P/D or local prefill on D).",
            [*labels, "decision"],
            registry=r,
        )
        for decision in ("split", "local"):
            self.routing.labels(model_name, decision)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Timing of one request (all of its choices). ``close()`` must run exactly once, in a finally."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._m = metrics
        self._label = metrics.model_name
        self._start = time.monotonic()
        self._last_token: dict[int, float] = {}
        self._first_seen = False
        self._closed = False
        metrics.waiting.labels(self._label).inc()

    def on_route(self, decision: str) -> None:
        self._m.routing.labels(self._label, decision).inc()

    def on_tokens(self, choice_index: int, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if not self._first_seen:
            self._first_seen = True
            self._m.ttft.labels(self._label).observe(now - self._start)
            self._m.waiting.labels(self._label).dec()
            self._m.running.labels(self._label).inc()
        previous = self._last_token.get(choice_index)
        if previous is not None:
            self._m.itl.labels(self._label).observe((now - previous) / count)
        self._last_token[choice_index] = now
        self._m.generation_tokens.labels(self._label).inc(count)

    def on_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        self._m.prompt_tokens.labels(self._label).inc(prompt_tokens)
        self._m.cached_prompt_tokens.labels(self._label).inc(cached_tokens)

    def on_choice_finished(self, finished_reason: str) -> None:
        self._m.success.labels(self._label, finished_reason).inc()

    def close(self, error_code: str | None = None) -> None:
        """End of the request: success (``error_code`` None) or failure with a short code."""
        if self._closed:
            return
        self._closed = True
        (self._m.running if self._first_seen else self._m.waiting).labels(self._label).dec()
        if error_code is not None:
            self._m.failure.labels(self._label, error_code).inc()
        else:
            self._m.e2e.labels(self._label).observe(time.monotonic() - self._start)
