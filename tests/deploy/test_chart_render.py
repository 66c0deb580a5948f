"""The chart lints clean, renders valid Kubernetes objects for every value set, and matches its goldens.

Regenerate the golden renders after an intended change with:

    BATON_UPDATE_GOLDEN=1 pytest -q tests/deploy/test_chart_render.py
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from . import crds
from .manifests import (
    CHART,
    CUSTOM_KINDS,
    VALUE_SETS,
    find,
    golden_text,
    helm,
    render_objects,
    value_set,
)

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate holds the Kubernetes schemas")

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with a schema.
KUBE_VERSIONS = ("1.30.0", kv.latest_version())


@pytest.fixture(scope="module", params=VALUE_SETS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render_objects(value_set(request.param))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict_has_no_errors_or_warnings(name: str) -> None:
    report = helm.lint(CHART, value_set(name), strict=True, namespace="llm", kube_version="v1.30.0")
    assert report["errors"] == [], report
    # Severity 2 = warning, 3 = error; strict mode already promotes warnings, check both anyway.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


def test_every_object_validates_against_the_kubernetes_schema(rendered) -> None:
    name, objs = rendered
    checked = 0
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{name}: {obj['kind']}/{obj['metadata']['name']} @ {version}: {path}: {exc.message}"
                )
        checked += 1
    assert checked >= 8, f"{name}: only {checked} core objects rendered"


def test_custom_resources_are_structurally_valid(rendered) -> None:
    name, objs = rendered

    def validate_pod(pod: dict[str, Any]) -> None:
        for version in KUBE_VERSIONS:
            kv.validate(pod, version, strict=True)

    for obj in objs:
        kind = obj["kind"]
        if kind == "RayCluster":
            crds.check_raycluster(obj, validate_pod)
        elif kind == "ServiceMonitor":
            crds.check_servicemonitor(obj, objs)
        elif kind == "PodMonitor":
            crds.check_podmonitor(obj, objs)
        elif kind == "ScaledObject":
            crds.check_scaledobject(obj, objs)
        else:
            assert (obj["apiVersion"], kind) not in CUSTOM_KINDS


def test_value_sets_exercise_every_custom_resource() -> None:
    kinds = {o["kind"] for name in VALUE_SETS for o in render_objects(value_set(name))}
    assert {"RayCluster", "ServiceMonitor", "PodMonitor", "ScaledObject", "HorizontalPodAutoscaler"} <= kinds


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(rendered) -> None:
    _, objs = rendered
    for hpa in find(objs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        deployment = find(objs, target["kind"], target["name"])
        assert deployment, f"HPA {hpa['metadata']['name']} targets nothing"
        assert "replicas" not in deployment[0]["spec"]
        metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        assert metric == "baton:num_requests_waiting"


def test_golden_renders(rendered) -> None:
    name, objs = rendered
    path = os.path.join(GOLDEN_DIR, f"{name}.yaml")
    text = golden_text(objs)
    if os.environ.get("BATON_UPDATE_GOLDEN") == "1":
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
    assert os.path.exists(path), f"no golden render {path}; create it with BATON_UPDATE_GOLDEN=1"
    with open(path) as fh:
        expected = fh.read()
    assert text == expected, (
        f"{name} render differs from {path}; if intended, regenerate with BATON_UPDATE_GOLDEN=1"
    )
