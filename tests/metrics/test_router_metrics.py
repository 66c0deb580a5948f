"""The router's /metrics on the real app (a fake backend stands in for the workers: this tests the
router as their caller), the cluster view it builds from worker snapshots, and the request-id path."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from baton.v1 import common_pb2
from baton.worker_metrics import WORKER_FAMILIES
from router.app import create_app
from router.config import RouterConfig
from router.metrics import WorkerSnapshots
from router.placement import EmbeddedPlacementStore
from router.registrar import WorkerRegistrar
from tests.metrics.families import families, sample_worker_info
from tests.metrics.harness import samples, trace_fields, worker_labels
from tests.router.router_testkit import FakeBackend, build_tokenizer_dir, serve

# What the router itself exposes (counters by family name, as a text parser reports them).
ROUTER_FAMILIES = (
    "baton:time_to_first_token_seconds",
    "baton:inter_token_latency_seconds",
    "baton:request_time_per_output_token_seconds",
    "baton:e2e_request_latency_seconds",
    "baton:request_queue_time_seconds",
    "baton:request_success",
    "baton:request_failure",
    "baton:prompt_tokens",
    "baton:prompt_tokens_cached",
    "baton:generation_tokens",
    "baton:num_requests_running",
    "baton:num_requests_waiting",
    "baton:routing_decisions",
)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    from baton.text import Tokenizer

    tokenizer = Tokenizer.from_dir(build_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    app = create_app(RouterConfig("m"), FakeBackend(tokenizer), EmbeddedPlacementStore(), tokenizer)
    with serve(app) as url, httpx.Client(timeout=20) as http:
        yield url, http, app


def test_router_exposes_its_families_and_the_worker_families(router) -> None:
    url, http, _ = router
    resp = http.get(f"{url}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    names = set(families(resp.text))
    assert set(ROUTER_FAMILIES) <= names
    assert set(WORKER_FAMILIES) <= names  # present (without samples) before any worker reports


def test_request_updates_latencies_and_logs_its_trace_line(router, caplog) -> None:
    url, http, _ = router
    before = samples(http.get(f"{url}/metrics").text)
    caplog.set_level(logging.INFO, logger="router.trace")
    body = {"model": "m", "prompt": "x" * 40, "max_tokens": 4}  # the fake splits prompts >= 32 tokens
    resp = http.post(f"{url}/v1/completions", json=body, headers={"X-Request-Id": "client-42"})
    assert resp.status_code == 200
    after = samples(http.get(f"{url}/metrics").text)
    for name in ("request_time_per_output_token_seconds_count", "e2e_request_latency_seconds_count"):
        key = (f"baton:{name}", ())
        assert after[key] - before.get(key, 0) == 1, name
    [line] = [trace_fields(r.getMessage()) for r in caplog.records if r.name == "router.trace"]
    assert (line["request"], line["status"], line["route"], line["P"], line["D"]) == (
        "client-42",
        "ok",
        "split",
        "p0",
        "d0",
    )
    assert line["tokens"] == "4" and line["queue_ms"] == "-"  # the fake backend measures no phases


def test_invalid_client_request_ids_are_replaced(router, caplog) -> None:
    url, http, _ = router
    caplog.set_level(logging.INFO, logger="router.trace")
    resp = http.post(
        f"{url}/v1/completions",
        json={"model": "m", "prompt": "x", "max_tokens": 2},
        headers={"X-Request-Id": "bad id\t!"},
    )
    assert resp.status_code == 200
    [line] = [trace_fields(r.getMessage()) for r in caplog.records if r.name == "router.trace"]
    assert line["request"] != "bad" and len(line["request"]) == 32  # a generated id
    assert line["route"] == "local"


def test_failed_request_trace_line_carries_the_error(router, caplog) -> None:
    url, http, app = router
    backend = app.state.handlers.backend
    caplog.set_level(logging.INFO, logger="router.trace")
    backend.fail_after = 0
    try:
        resp = http.post(
            f"{url}/v1/completions", json={"model": "m", "prompt": "x"}, headers={"X-Request-Id": "r-fail"}
        )
    finally:
        backend.fail_after = None
    assert resp.status_code == 503
    [line] = [trace_fields(r.getMessage()) for r in caplog.records if r.name == "router.trace"]
    assert (line["request"], line["status"], line["route"], line["tokens"]) == (
        "r-fail",
        "unavailable",
        "-",
        "0",
    )


def test_worker_snapshots_join_the_router_families_and_expire(router) -> None:
    url, http, app = router
    metrics = app.state.metrics
    metrics.workers.observe(sample_worker_info("prefill-9", common_pb2.WORKER_ROLE_PREFILL))
    s = samples(http.get(f"{url}/metrics").text)
    labels = worker_labels("prefill-9", "prefill")
    assert s[("baton:num_requests_running", labels)] == 1  # the worker's series, in the router's family
    assert ("baton:num_requests_running", ()) in s  # beside the router's own
    assert s[("baton:kv_cache_usage_perc", labels)] == 0.5
    metrics.workers.forget("prefill-9")
    assert ("baton:num_requests_running", labels) not in samples(http.get(f"{url}/metrics").text)


def test_stale_snapshots_are_dropped() -> None:
    snapshots = WorkerSnapshots(stale_after_s=0.05)
    snapshots.observe(sample_worker_info("decode-1"))
    assert [i.worker_id for i in snapshots.current()] == ["decode-1"]
    time.sleep(0.1)
    assert snapshots.current() == []


def test_registrar_feeds_observers_and_survives_their_bugs() -> None:
    seen: list[str] = []

    def observer(info: common_pb2.WorkerInfo) -> None:
        seen.append(info.worker_id)
        raise RuntimeError("observer bug")

    async def scenario() -> list[str]:
        store = EmbeddedPlacementStore()
        registrar = WorkerRegistrar(store, on_info=observer)
        info = sample_worker_info("decode-2")
        info.address, info.block_size, info.model_fingerprint = "127.0.0.1:1", 4, "fp"
        await registrar.register(info)
        assert await registrar.publish_info(info) is True
        return [w.worker_id for w in await store.live_workers()]

    assert asyncio.run(scenario()) == ["decode-2"]
    assert seen == ["decode-2"]
