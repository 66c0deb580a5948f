"""The worker actor (what ``baton serve`` / ``baton worker`` run) serves /metrics when given a port."""

from __future__ import annotations

import urllib.request

import pytest

from baton.launcher.actors import WorkerActor, WorkerSpec
from baton.worker_metrics import WORKER_FAMILIES, metrics_port_from_env
from tests.metrics.families import families
from tests.metrics.harness import samples, worker_labels


def test_actor_serves_metrics_on_a_free_port_and_reports_it() -> None:
    spec = WorkerSpec(
        role="decode", worker_id="decode-m", model="dummy:tiny-llama", secret="s3cret", transport="gloo",
        block_size=4, num_kv_blocks=64, max_model_len=256, metrics_port=0,
    )  # fmt: skip
    actor = WorkerActor(spec)
    try:
        address = actor.ready()["metrics_address"]
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert set(WORKER_FAMILIES) <= set(families(text))
        s = samples(text)
        labels = worker_labels("decode-m", "decode")
        assert s[("baton:kv_cache_usage_perc", labels)] == 0.0
        assert s[("baton:num_requests_running", labels)] == 0
    finally:
        actor.stop()
    with pytest.raises(OSError):  # the endpoint is gone with the actor
        urllib.request.urlopen(f"http://{address}/metrics", timeout=2)


def test_actor_without_a_port_serves_no_metrics() -> None:
    spec = WorkerSpec(
        role="prefill", worker_id="prefill-m", model="dummy:tiny-llama", secret="s3cret", transport="gloo",
        block_size=4, num_kv_blocks=64, max_model_len=256,
    )  # fmt: skip
    actor = WorkerActor(spec)
    try:
        assert actor.ready()["metrics_address"] == ""
    finally:
        actor.stop()


@pytest.mark.parametrize("raw, port", [("", None), ("auto", None), ("0", 0), ("9090", 9090)])
def test_metrics_port_from_env(raw: str, port: int | None) -> None:
    assert metrics_port_from_env({"BATON_METRICS_PORT": raw}) == port


@pytest.mark.parametrize("raw", ["abc", "70000", "-1"])
def test_bad_metrics_port_is_a_clear_error(raw: str) -> None:
    with pytest.raises(ValueError, match="BATON_METRICS_PORT"):
        metrics_port_from_env({"BATON_METRICS_PORT": raw})
