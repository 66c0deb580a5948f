"""Render the Helm chart with the real Helm engine and take the rendered objects apart.

The chart is rendered offline by helm-python-sdk (Helm v4's Go SDK): ``lookup`` returns nothing, so
every chart-generated Secret gets a fresh random value, which ``mask_generated_secrets`` replaces
before renders are compared with the golden files.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart with Helm's own engine")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "baton"
VALUE_SETS = ("default", "gpu", "external-redis", "kuberay")
RELEASE, NAMESPACE = "baton", "llm"

# Variables the chart sets that baton/settings.py does not read, each for a stated reason.
NCCL_SAFETY_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
RAY_AUTH_ENV = frozenset({"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"})  # Ray's own token auth (deployments mode)

# Objects whose API group kubernetes-validate has no schema for: checked structurally below.
CUSTOM_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}


def value_set(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text()) or {}


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included)."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object, in template-path order."""
    out: list[dict[str, Any]] = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return out


_RENDER_CACHE: dict[str, list[dict[str, Any]]] = {}


def render_objects(values: dict[str, Any] | None = None, *, fresh: bool = False) -> list[dict[str, Any]]:
    """The rendered objects for ``values``; cached per values (callers get their own copy) unless ``fresh``."""
    key = json.dumps(values or {}, sort_keys=True)
    if fresh or key not in _RENDER_CACHE:
        _RENDER_CACHE[key] = objects(render(values))
    return copy.deepcopy(_RENDER_CACHE[key])


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod template) of every workload, the RayCluster's head and worker groups included."""
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet"):
        yield f"{kind}/{obj['metadata']['name']}", obj["spec"]["template"]
    elif kind == "RayCluster":
        yield "RayCluster/head", obj["spec"]["headGroupSpec"]["template"]
        for group in obj["spec"].get("workerGroupSpecs", []):
            yield f"RayCluster/{group['groupName']}", group["template"]


def baton_containers(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, pod template, container) for every container running the Baton image."""
    for obj in objs:
        for label, template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                if not container["image"].startswith("redis"):
                    yield f"{label}/{container['name']}", template, container


def env_names(container: dict[str, Any]) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


def literal_env(container: dict[str, Any], pod_ip: str = "10.1.2.3") -> dict[str, str]:
    """The container's environment as a process would see it (downward-API podIP filled in)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[e["name"]] = pod_ip
        else:
            raise AssertionError(f"unexpected env source for {e['name']}: {e}")
    return env


def mask_generated_secrets(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies with every Secret data value replaced by a marker (they are random per offline render)."""
    masked = copy.deepcopy(objs)
    for obj in masked:
        if obj["kind"] == "Secret":
            obj["data"] = {key: "<generated>" for key in obj.get("data", {})}
    return masked


def golden_text(objs: list[dict[str, Any]]) -> str:
    docs = [yaml.safe_dump(o, sort_keys=False, width=120) for o in mask_generated_secrets(objs)]
    return "---\n" + "---\n".join(docs)


def label_selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics for matchLabels + matchExpressions (In/NotIn/Exists)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
