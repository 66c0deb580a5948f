"""Structural checks of the custom resources the chart renders (no schema ships for them offline).

Each check asserts the shape the operator needs (apiVersion/kind/metadata/spec, required fields and
their types) and the references into the rest of the release (ports, Services, Deployments exist).
Pod templates embedded in a RayCluster are validated as real Pods against the Kubernetes schema.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .manifests import find, label_selector_matches, pod_templates

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")

PodValidator = Callable[[dict[str, Any]], None]


def check_metadata(obj: dict[str, Any]) -> None:
    meta = obj.get("metadata")
    assert isinstance(meta, dict), f"{obj['kind']}: metadata missing"
    name = meta.get("name", "")
    assert DNS_LABEL.match(name) and len(name) <= 63, f"{obj['kind']}: bad name {name!r}"
    for key, value in (meta.get("labels") or {}).items():
        assert isinstance(value, str) and len(value) <= 63, f"{obj['kind']}/{name}: label {key}={value!r}"
    for key, value in (meta.get("annotations") or {}).items():
        assert isinstance(value, str), f"{obj['kind']}/{name}: annotation {key} must be a string"
    assert isinstance(obj.get("spec"), dict), f"{obj['kind']}/{name}: spec missing"


def _check_ray_start_params(where: str, params: Any) -> None:
    assert isinstance(params, dict), f"{where}: rayStartParams must be a map"
    for key, value in params.items():
        assert isinstance(value, str), f"{where}: rayStartParams.{key} must be a string, got {value!r}"


def check_raycluster(obj: dict[str, Any], validate_pod: PodValidator) -> None:
    assert obj["apiVersion"] == "ray.io/v1"
    check_metadata(obj)
    spec = obj["spec"]
    assert re.match(r"^[0-9]+\.[0-9]+\.[0-9]+", spec["rayVersion"]), "rayVersion must be a Ray version"
    if "authOptions" in spec:
        assert spec["authOptions"]["mode"] in ("disabled", "token")
    assert isinstance(spec.get("enableInTreeAutoscaling", False), bool)
    head = spec["headGroupSpec"]
    _check_ray_start_params("headGroupSpec", head["rayStartParams"])
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), f"duplicate worker groups {names}"
    for group in groups:
        where = f"workerGroupSpecs[{group['groupName']}]"
        assert DNS_LABEL.match(group["groupName"]), where
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(group[key], int) and group[key] >= 0, f"{where}.{key}"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (
            f"{where}: min <= replicas <= max"
        )
        _check_ray_start_params(where, group["rayStartParams"])
    for label, template in pod_templates(obj):
        validate_pod(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "ray-pod", **(template.get("metadata") or {})},
                "spec": template["spec"],
            }
        )
        assert template["spec"]["containers"], f"{label}: no containers"


def _ports_of_service(svc: dict[str, Any]) -> set[str]:
    return {p["name"] for p in svc["spec"]["ports"]}


def check_servicemonitor(obj: dict[str, Any], objs: list[dict[str, Any]]) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    check_metadata(obj)
    spec = obj["spec"]
    services = [
        s for s in find(objs, "Service") if label_selector_matches(spec["selector"], s["metadata"]["labels"])
    ]
    assert services, "ServiceMonitor selects no Service of the release"
    assert spec["endpoints"], "ServiceMonitor has no endpoints"
    for endpoint in spec["endpoints"]:
        assert all(endpoint["port"] in _ports_of_service(s) for s in services), (
            f"unknown port {endpoint['port']}"
        )
        assert endpoint["path"].startswith("/")
        assert DURATION.match(endpoint["interval"])
        for relabel in endpoint.get("relabelings", []):
            assert "targetLabel" in relabel


def check_podmonitor(obj: dict[str, Any], objs: list[dict[str, Any]]) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    check_metadata(obj)
    spec = obj["spec"]
    selected = [
        template
        for o in objs
        for _, template in pod_templates(o)
        if label_selector_matches(spec["selector"], template["metadata"]["labels"])
    ]
    assert selected, "PodMonitor selects no pod of the release"
    assert spec["podMetricsEndpoints"], "PodMonitor has no endpoints"
    for endpoint in spec["podMetricsEndpoints"]:
        for template in selected:
            ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            assert endpoint["port"] in ports, f"selected pod has no port {endpoint['port']}"
        assert DURATION.match(endpoint["interval"])


def check_scaledobject(obj: dict[str, Any], objs: list[dict[str, Any]]) -> None:
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    check_metadata(obj)
    spec = obj["spec"]
    target = spec["scaleTargetRef"]["name"]
    deployments = find(objs, "Deployment", target)
    assert deployments, f"ScaledObject targets unknown Deployment {target}"
    assert "replicas" not in deployments[0]["spec"], "a scaled Deployment must not pin spec.replicas"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"], "ScaledObject has no triggers"
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        metadata = trigger["metadata"]
        assert all(isinstance(v, str) for v in metadata.values()), "KEDA trigger metadata must be strings"
        assert {"serverAddress", "query", "threshold"} <= metadata.keys()
        assert "baton:num_requests_waiting" in metadata["query"]
        float(metadata["threshold"])
