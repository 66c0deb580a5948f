"""The compose file, the KubeRay example and the Grafana dashboard speak the same contract as the code."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from baton.settings import ENV_DOCS, ENV_VARS, ROLES, Settings
from tests.metrics.families import exposed_metric_names

from . import crds
from .manifests import CHART, NCCL_SAFETY_ENV, RAY_AUTH_ENV, baton_containers, literal_env, render_objects

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate holds the Kubernetes schemas")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALLOWED_ENV = ENV_VARS | set(NCCL_SAFETY_ENV) | RAY_AUTH_ENV

# The metric names dashboards may use: what the router's and a worker's registries really expose
# (histograms also expose _bucket/_sum/_count series).
DASHBOARD_METRICS = exposed_metric_names()


# --- compose -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _baton_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc["image"].startswith("baton:")}


def test_compose_services_use_only_known_variables(compose) -> None:
    services = _baton_services(compose)
    assert set(services) == {"ray-head", "prefill", "decode", "router"}
    for name, svc in services.items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert set(env) <= ALLOWED_ENV, f"{name}: {sorted(set(env) - ALLOWED_ENV)}"
        assert {k: env.get(k) for k in NCCL_SAFETY_ENV} == NCCL_SAFETY_ENV, name
        role = svc["command"][0]
        assert role in ROLES and role == name
        settings = Settings.from_env({**env, "BATON_ROLE": role})
        if role != "ray-head":
            assert settings.redis_url and settings.secret_file == "/run/secrets/baton_secret", name


def test_compose_workers_advertise_their_own_address_and_join_the_head(compose) -> None:
    services = _baton_services(compose)
    subnet = ipaddress.ip_network(compose["networks"]["baton"]["ipam"]["config"][0]["subnet"])
    head_ip = services["ray-head"]["networks"]["baton"]["ipv4_address"]
    for name in ("ray-head", "prefill", "decode"):
        svc = services[name]
        ip = svc["networks"]["baton"]["ipv4_address"]
        assert ipaddress.ip_address(ip) in subnet and svc["environment"]["BATON_HOST"] == ip, name
    for name in ("prefill", "decode"):
        assert services[name]["environment"]["BATON_RAY_ADDRESS"] == f"{head_ip}:6379"


def test_compose_publishes_only_the_router_on_loopback(compose) -> None:
    published = {name: svc.get("ports", []) for name, svc in compose["services"].items() if svc.get("ports")}
    assert set(published) == {"router"}
    assert all(port.startswith("127.0.0.1:") for port in published["router"])
    redis = compose["services"]["redis"]
    assert "requirepass" in " ".join(redis["command"]) and "baton_secret" in redis["healthcheck"]["test"][1]


# --- the KubeRay example -------------------------------------------------------------------------


def test_kuberay_example_validates_and_uses_known_variables() -> None:
    objs = [o for o in yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text()) if o]
    assert {o["kind"] for o in objs} == {"RayCluster", "Deployment", "Service"}

    def validate(obj: dict[str, Any]) -> None:
        kv.validate(obj, "1.30.0", strict=True)

    for obj in objs:
        if obj["kind"] == "RayCluster":
            crds.check_raycluster(obj, validate)
        else:
            validate(obj)
    containers = list(baton_containers(objs))
    assert len(containers) == 4
    for label, _, container in containers:
        names = {e["name"] for e in container["env"]}
        assert names <= ALLOWED_ENV, f"{label}: {sorted(names - ALLOWED_ENV)}"
        settings = Settings.from_env(literal_env(container))
        assert settings.role == container["args"][0], label
        assert settings.redis_url and settings.secret_file, label


def test_kuberay_example_and_chart_agree_on_the_launcher_contract() -> None:
    (example,) = [
        o
        for o in yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
        if o and o["kind"] == "RayCluster"
    ]
    chart_values = yaml.safe_load((CHART / "ci" / "kuberay-values.yaml").read_text())
    (chart,) = [o for o in render_objects(chart_values) if o["kind"] == "RayCluster"]
    for cluster in (example, chart):
        head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["args"] == ["ray-head", "baton", "up"]
        assert literal_env(head)["BATON_RAY_ROLE_RESOURCES"] == "true"
        assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        assert cluster["spec"]["authOptions"] == {"mode": "token"}
        params = {
            g["groupName"]: g["rayStartParams"]["resources"] for g in cluster["spec"]["workerGroupSpecs"]
        }
        assert params == {role: f'"{{\\"baton_{role}\\": 1}}"' for role in ("prefill", "decode")}


# --- the dashboard and the docs ------------------------------------------------------------------


def _dashboard_files() -> list[Path]:
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files, "the chart ships no dashboard"
    return files


@pytest.mark.parametrize("path", _dashboard_files(), ids=lambda p: p.name)
def test_dashboards_are_valid_and_use_only_known_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    assert "placeholder" not in path.read_text().lower() and "todo" not in path.read_text().lower()
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    exprs = [t["expr"] for panel in panels for t in panel["targets"]]
    assert exprs and all(panel["targets"] for panel in panels)
    used = set(re.findall(r"baton:[a-z0-9_]+", " ".join(exprs)))
    used = {re.sub(r"_(bucket|sum|count)$", "", m) if not m.endswith("_total") else m for m in used}
    assert used and used <= DASHBOARD_METRICS, sorted(used - DASHBOARD_METRICS)
    assert {
        "baton:time_to_first_token_seconds",
        "baton:num_requests_waiting",
        "baton:kv_cache_usage_perc",
    } <= used


def test_dashboard_configmap_carries_the_dashboard() -> None:
    objs = render_objects({"metrics": {"grafanaDashboard": {"enabled": True}}})
    maps = [o for o in objs if o["kind"] == "ConfigMap"]
    assert len(maps) == len(_dashboard_files())
    for config_map, path in zip(maps, _dashboard_files(), strict=True):
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())


def test_chart_dashboard_matches_the_deploy_copy_when_there_is_one() -> None:
    deploy_copy = DEPLOY / "grafana" / "baton-dashboard.json"
    if not deploy_copy.exists():
        pytest.skip("deploy/grafana/baton-dashboard.json is not written yet")
    assert json.loads(deploy_copy.read_text()) in [json.loads(p.read_text()) for p in _dashboard_files()]


def test_deploy_readme_documents_every_variable() -> None:
    readme = (DEPLOY / "README.md").read_text()
    documented = set(re.findall(r"^\| `(BATON_[A-Z_]+)` \|", readme, flags=re.MULTILINE))
    assert documented == set(ENV_DOCS)
