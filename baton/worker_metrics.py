"""Workers in Prometheus: snapshot -> metric families, and the ``/metrics`` HTTP server of a worker.

A worker's numbers travel as one ``baton.v1.WorkerInfo`` snapshot (``baton.convert.worker_info``).
``worker_families`` turns snapshots into Prometheus families; the worker's own ``/metrics`` and the
router's cluster view (the snapshots its registrar polls, ``router.metrics``) both use it, so one
scrape of either shows the same names, labels and meanings.

Families (labels ``model_name``, ``worker_id``, ``role``; vLLM's names with the ``baton:`` prefix):

===========================================  =========  ==============================================
baton:num_requests_running                   gauge      requests in the engine's running batch
baton:num_requests_waiting                   gauge      requests queued in the engine
baton:kv_cache_usage_perc                    gauge      fraction of KV blocks in use, in [0, 1]
baton:prefix_cache_queries_total             counter    prompt tokens looked up in the prefix cache
baton:prefix_cache_hits_total                counter    of those, tokens found
baton:num_preemptions_total                  counter    requests preempted (blocks reclaimed)
baton:prompt_tokens_total                    counter    prompt tokens of requests this worker prefilled
baton:generation_tokens_total                counter    tokens this worker sampled
baton:request_queue_time_seconds             histogram  request admitted -> first scheduled
baton:kv_transfer_time_seconds               histogram  prefill: first piece sent -> acknowledged;
                                                        decode: blocks reserved -> KV landed
baton:kv_transfer_bytes_total                counter    KV bytes moved (blocks x bytes per block)
baton:kv_transfer_failures_total             counter    transfers that failed or timed out
baton:spec_decode_num_drafts_total           counter    speculative steps (zero when off)
baton:spec_decode_num_draft_tokens_total     counter    tokens proposed
baton:spec_decode_num_accepted_tokens_total  counter    tokens accepted
baton:spec_decode_num_accepted_tokens_per_pos_total  counter  tokens accepted, label ``position``
===========================================  =========  ==============================================

Ports: a worker process serves ``/metrics`` when given a metrics port (``--metrics-port``, or
``BATON_METRICS_PORT`` for ``baton worker`` containers; 0 picks a free port). ``baton serve`` runs
several workers per host, so its actors take free ports and report them (``metrics_address`` in
``WorkerActor.ready()``); one scrape of the router shows every worker anyway.

This module stays torch-free: the router imports it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from baton.v1 import common_pb2

log = logging.getLogger(__name__)

LABELS = ("model_name", "worker_id", "role")
_ROLE_NAMES = {common_pb2.WORKER_ROLE_PREFILL: "prefill", common_pb2.WORKER_ROLE_DECODE: "decode"}

# name -> (help, WorkerStats field). Counters are named without ``_total`` (the exposition adds it).
_GAUGES = {
    "baton:num_requests_running": ("Requests in the worker's running batch.", "num_running"),
    "baton:num_requests_waiting": ("Requests queued in the worker's engine.", "num_waiting"),
    "baton:kv_cache_usage_perc": ("Fraction of KV cache blocks in use (0-1).", "kv_cache_usage"),
}
_COUNTERS = {
    "baton:prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
    "baton:prefix_cache_hits": ("Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    "baton:num_preemptions": ("Requests preempted (blocks reclaimed, recomputed later).", "num_preemptions"),
    "baton:prompt_tokens": ("Prompt tokens of requests this worker prefilled.", "num_prompt_tokens"),
    "baton:generation_tokens": ("Tokens this worker sampled.", "num_generated_tokens"),
    "baton:kv_transfer_bytes": ("KV cache bytes moved (blocks x bytes per block).", "kv_transfer_bytes"),
    "baton:kv_transfer_failures": ("KV transfers that failed or timed out.", "kv_transfer_failures"),
    "baton:spec_decode_num_drafts": ("Speculative decoding steps.", "spec_decode_num_drafts"),
    "baton:spec_decode_num_draft_tokens": ("Draft tokens proposed.", "spec_decode_num_draft_tokens"),
    "baton:spec_decode_num_accepted_tokens": ("Draft tokens accepted.", "spec_decode_num_accepted_tokens"),
}
_HISTOGRAMS = {
    "baton:request_queue_time_seconds": (
        "Time from admission to first scheduling in the worker's engine.",
        "request_queue_time_seconds",
    ),
    "baton:kv_transfer_time_seconds": (
        "KV transfer time (prefill: first piece sent to acknowledged; decode: reserved to landed).",
        "kv_transfer_time_seconds",
    ),
}
_PER_POSITION = "baton:spec_decode_num_accepted_tokens_per_pos"  # counter labelled by draft position
# Family names as a Prometheus text parser reports them (counters without ``_total``).
WORKER_FAMILIES: tuple[str, ...] = (*_GAUGES, *_COUNTERS, _PER_POSITION, *_HISTOGRAMS)


def role_name(role: int) -> str:
    return _ROLE_NAMES.get(role, "unknown")


def histogram_buckets(h: common_pb2.Histogram) -> list[tuple[str, float]] | None:
    """Cumulative ``(le, count)`` pairs ending with ``+Inf``; None when the message is malformed."""
    bounds, counts = list(h.upper_bounds), list(h.bucket_counts)
    if len(counts) != len(bounds) + 1 or any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
        return None
    if any(c < 0 for c in counts) or sum(counts) != h.count:
        return None
    out, total = [], 0
    for bound, count in zip([*map(floatToGoString, bounds), "+Inf"], counts, strict=True):
        total += count
        out.append((bound, float(total)))
    return out


def worker_families(infos: Iterable[common_pb2.WorkerInfo]) -> list[Metric]:
    """Every family of ``WORKER_FAMILIES`` (present even without samples), one sample set per worker."""
    gauges = {name: GaugeMetricFamily(name, doc, labels=LABELS) for name, (doc, _) in _GAUGES.items()}
    counters = {name: CounterMetricFamily(name, doc, labels=LABELS) for name, (doc, _) in _COUNTERS.items()}
    hists = {name: HistogramMetricFamily(name, doc, labels=LABELS) for name, (doc, _) in _HISTOGRAMS.items()}
    per_pos = CounterMetricFamily(_PER_POSITION, "Draft tokens accepted, by position in the draft.", labels=[*LABELS, "position"])
    for info in infos:
        labels = [info.model_name, info.worker_id, role_name(info.role)]
        stats = info.stats
        for name, (_, field) in _GAUGES.items():
            gauges[name].add_metric(labels, float(getattr(stats, field)))
        for name, (_, field) in _COUNTERS.items():
            counters[name].add_metric(labels, float(getattr(stats, field)))
        for position, accepted in enumerate(stats.spec_decode_num_accepted_tokens_per_pos):
            per_pos.add_metric([*labels, str(position)], float(accepted))
        for name, (_, field) in _HISTOGRAMS.items():
            h = getattr(stats, field)
            buckets = histogram_buckets(h)
            if buckets is None:
                log.warning("worker %s sent a malformed %s histogram; skipped", info.worker_id, field)
                continue
            hists[name].add_metric(labels, buckets, h.sum)
    return [*gauges.values(), *counters.values(), per_pos, *hists.values()]


class WorkerCollector:
    """Collector over one worker's live snapshot (taken at scrape time)."""

    def __init__(self, snapshot: Callable[[], common_pb2.WorkerInfo]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from worker_families([self._snapshot()])


def worker_registry(snapshot: Callable[[], common_pb2.WorkerInfo]) -> CollectorRegistry:
    """A registry of its own (never the global one): several workers may share a test process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(snapshot))
    return registry


@dataclass
class MetricsServer:
    host: str
    port: int
    _server: object
    _thread: threading.Thread

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def metrics_port_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """``BATON_METRICS_PORT`` as the worker entry points read it: unset, empty or ``auto`` -> None."""
    raw = (os.environ if environ is None else environ).get("BATON_METRICS_PORT", "").strip().lower()
    if raw in ("", "auto"):
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"BATON_METRICS_PORT={raw!r}: expected a port number or auto") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"BATON_METRICS_PORT={port}: expected a port in [0, 65535]")
    return port


def serve_worker_metrics(
    snapshot: Callable[[], common_pb2.WorkerInfo], host: str, port: int
) -> MetricsServer:
    """Serve ``GET /metrics`` for one worker on ``host:port`` (0: a free port) in a daemon thread."""
    server, thread = start_http_server(port, addr=host, registry=worker_registry(snapshot))
    return MetricsServer(host, server.server_port, server, thread)
