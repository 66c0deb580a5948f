"""The metric names Baton exposes, read from the real registries built in-process (router + worker)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from baton.v1 import common_pb2
from baton.worker_metrics import worker_registry


def sample_worker_info(
    worker_id: str = "decode-0", role: int = common_pb2.WORKER_ROLE_DECODE
) -> common_pb2.WorkerInfo:
    """A well-formed snapshot (values are irrelevant to which families exist)."""
    hist = common_pb2.Histogram(upper_bounds=[0.1, 1.0], bucket_counts=[1, 0, 0], sum=0.05, count=1)
    stats = common_pb2.WorkerStats(
        num_running=1, kv_cache_usage=0.5, kv_transfer_time_seconds=hist, request_queue_time_seconds=hist
    )
    return common_pb2.WorkerInfo(worker_id=worker_id, role=role, model_name="m", stats=stats)


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def exposed_names(text: str) -> set[str]:
    """Names a query may use: counters with ``_total``, gauges and histograms by their family name."""
    return {name + "_total" if f.type == "counter" else name for name, f in families(text).items()}


def router_exposition(with_worker: bool = True) -> str:
    from router.metrics import RouterMetrics

    metrics = RouterMetrics("m")
    if with_worker:
        metrics.workers.observe(sample_worker_info())
    return metrics.render().decode()


def worker_exposition() -> str:
    return generate_latest(worker_registry(sample_worker_info)).decode()


def exposed_metric_names() -> set[str]:
    """Every ``baton:`` name the router's and a worker's ``/metrics`` expose."""
    names = exposed_names(router_exposition()) | exposed_names(worker_exposition())
    return {n for n in names if n.startswith("baton:") and not n.endswith("_created")}
