"""The Grafana dashboard: shipped by the chart as in deploy/, sections present, and every metric it
queries exists in what the router's and a worker's registries really expose."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.metrics.families import exposed_metric_names

REPO = Path(__file__).resolve().parents[2]
DEPLOY_COPY = REPO / "deploy" / "grafana" / "baton-dashboard.json"
CHART_DASHBOARDS = REPO / "helm" / "baton" / "dashboards"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DEPLOY_COPY.read_text())


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _used_metrics(dashboard: dict) -> set[str]:
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    used = set(re.findall(r"baton:[a-z0-9_]+", exprs))
    return {m if m.endswith("_total") else re.sub(r"_(bucket|sum|count)$", "", m) for m in used}


def test_the_chart_ships_the_deploy_dashboard(dashboard: dict) -> None:
    shipped = [json.loads(p.read_text()) for p in sorted(CHART_DASHBOARDS.glob("*.json"))]
    assert dashboard in shipped


def test_dashboard_queries_only_metrics_that_exist(dashboard: dict) -> None:
    used = _used_metrics(dashboard)
    exposed = exposed_metric_names()
    assert used <= exposed, sorted(used - exposed)


def test_dashboard_covers_every_section_and_family(dashboard: dict) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Latency", "KV cache", "KV transfers", "Speculative decoding"]
    assert {
        "baton:time_to_first_token_seconds",
        "baton:inter_token_latency_seconds",
        "baton:request_time_per_output_token_seconds",
        "baton:e2e_request_latency_seconds",
        "baton:request_queue_time_seconds",
        "baton:num_requests_running",
        "baton:num_requests_waiting",
        "baton:routing_decisions_total",
        "baton:kv_cache_usage_perc",
        "baton:prefix_cache_hits_total",
        "baton:prefix_cache_queries_total",
        "baton:num_preemptions_total",
        "baton:kv_transfer_time_seconds",
        "baton:kv_transfer_bytes_total",
        "baton:kv_transfer_failures_total",
        "baton:spec_decode_num_drafts_total",
        "baton:spec_decode_num_draft_tokens_total",
        "baton:spec_decode_num_accepted_tokens_total",
    } <= _used_metrics(dashboard)


def test_dashboard_layout_is_well_formed(dashboard: dict) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24
    for p in _panels(dashboard):
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)) and p["datasource"]["uid"] == "${datasource}", p["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "release", "model"} <= variables
    exprs = [t["expr"] for p in _panels(dashboard) for t in p["targets"]]
    assert all('baton_release=~"$release"' in e for e in exprs)
