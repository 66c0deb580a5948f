"""What the chart promises about its values and the pods it builds from them.

- the values schema rejects typos and wrong types;
- no secret lives in values, Secrets reach processes as files, generated ones are random;
- every env var of a Baton container is one baton/settings.py reads (plus the NCCL safety trio),
  and the rendered environment parses into the Settings the values asked for;
- only the router can be exposed, and the NetworkPolicy lets nothing else in from outside.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
import yaml

from baton.settings import ENV_VARS, Settings

from .manifests import (
    CHART,
    NCCL_SAFETY_ENV,
    RAY_AUTH_ENV,
    VALUE_SETS,
    baton_containers,
    env_names,
    find,
    helm,
    label_selector_matches,
    literal_env,
    pod_templates,
    render,
    render_objects,
    value_set,
)


def _render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as info:
        render(values)
    return str(info.value)


# --- the values schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"router": {"replicas": "two"}}, "/router/replicas"),
        ({"prefill": {"gpusPerWorker": 1.5}}, "/prefill/gpusPerWorker"),
        ({"engine": {"gpuMemoryUtilization": 1.5}}, "/engine/gpuMemoryUtilization"),
        ({"router": {"service": {"type": "Ingress"}}}, "/router/service/type"),
        ({"ray": {"mode": "swarm"}}, "/ray/mode"),
        ({"model": {"source": "s3"}}, "/model/source"),
        ({"workers": {"ports": {"grpc": 70000}}}, "/workers/ports/grpc"),
    ],
)
def test_schema_rejects_wrong_types_and_values(values: dict[str, Any], complaint: str) -> None:
    assert complaint in _render_error(values)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"routr": {"replicas": 2}}, "routr"),
        ({"router": {"replicaz": 2}}, "replicaz"),
        ({"decode": {"gpus": 1}}, "gpus"),
        ({"redis": {"external": {"password": "hunter2"}}}, "password"),
        ({"auth": {"secret": "hunter2"}}, "secret"),
    ],
)
def test_schema_rejects_unknown_keys(values: dict[str, Any], complaint: str) -> None:
    message = _render_error(values)
    assert "additional properties" in message and complaint in message


def test_schema_is_draft07_and_closed_on_every_main_section() -> None:
    with helm.Chart.load(CHART) as chart:
        schema = chart.schema
        defaults = chart.values
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    for section in ("router", "model", "redis", "ray", "metrics", "autoscaling", "auth", "engine", "workers"):
        assert schema["properties"][section]["additionalProperties"] is False, section
    assert schema["definitions"]["worker"]["additionalProperties"] is False
    assert set(defaults) <= set(schema["properties"]), "a default value has no schema entry"


def test_cross_field_rules_fail_with_a_clear_message() -> None:
    assert "placement store is required" in _render_error({"redis": {"enabled": False}})
    assert "model.pvc.claimName" in _render_error({"model": {"source": "pvc", "name": "m"}})
    assert "needs model.name" in _render_error({"model": {"source": "hf"}})
    kuberay_hpa = {"ray": {"mode": "kuberay"}, "autoscaling": {"enabled": True}}
    assert "ray.kuberay.autoscaler" in _render_error(kuberay_hpa)
    uneven = {"ray": {"mode": "kuberay"}, "prefill": {"gpusPerWorker": 1}, "decode": {"gpusPerWorker": 2}}
    assert "gpusPerWorker" in _render_error(uneven)


# --- secrets -------------------------------------------------------------------------------------

_SECRETISH_KEY = re.compile(r"secret|password|token|credential", re.IGNORECASE)


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [item for key, value in node.items() for item in _walk(value, f"{path}.{key}")]
    return [(path, node)]


def test_default_values_hold_no_secret() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, value in _walk(defaults):
        leaf = path.rsplit(".", 1)[-1]
        if not _SECRETISH_KEY.search(leaf) or not isinstance(value, str) or not value:
            continue
        # Non-empty secret-ish leaves may only name a key inside a Secret, never hold a value.
        assert leaf.endswith("Key"), f"{path} = {value!r} looks like a secret in values.yaml"


def test_generated_secrets_are_random_and_never_from_values() -> None:
    first = {s["metadata"]["name"]: s["data"] for s in find(render_objects(fresh=True), "Secret")}
    second = {s["metadata"]["name"]: s["data"] for s in find(render_objects(fresh=True), "Secret")}
    assert set(first) == {"baton-auth", "baton-redis"}
    for name, data in first.items():
        for key, encoded in data.items():
            value = base64.b64decode(encoded).decode()
            assert re.fullmatch(r"[A-Za-z0-9]{48}", value), f"{name}/{key}"
            assert encoded != second[name][key], f"{name}/{key} is not random"


def test_existing_secrets_are_referenced_not_generated() -> None:
    objs = render_objects(value_set("external-redis"))
    assert find(objs, "Secret") == []
    sources = [
        source["secret"]["name"]
        for _, template, _ in baton_containers(objs)
        for volume in template["spec"]["volumes"]
        if "projected" in volume
        for source in volume["projected"]["sources"]
    ]
    assert set(sources) == {"baton-shared-secret", "platform-redis"}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_reach_processes_as_files_only(name: str) -> None:
    for label, _, container in baton_containers(render_objects(value_set(name))):
        names = env_names(container)
        assert "BATON_SECRET" not in names and "BATON_REDIS_PASSWORD" not in names, label
        assert all("secretKeyRef" not in str(e.get("valueFrom", "")) for e in container.get("env", [])), label
        mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
        for variable in ("BATON_SECRET_FILE", "BATON_REDIS_PASSWORD_FILE", "RAY_AUTH_TOKEN_PATH"):
            if variable in names:
                path = literal_env(container)[variable]
                assert path.rsplit("/", 1)[0] in mounted, f"{label}: {variable}={path} is not mounted"


# --- the environment contract --------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_env_var_is_one_the_code_reads(name: str) -> None:
    objs = render_objects(value_set(name))
    containers = list(baton_containers(objs))
    assert len(containers) >= 4
    for label, _, container in containers:
        names = env_names(container)
        assert len(names) == len(set(names)), f"{label}: duplicate env vars"
        foreign = set(names) - ENV_VARS - set(NCCL_SAFETY_ENV) - RAY_AUTH_ENV
        assert not foreign, f"{label}: {sorted(foreign)} are not read by baton.settings"
        env = literal_env(container)
        for variable, value in NCCL_SAFETY_ENV.items():
            assert env.get(variable) == value, f"{label}: {variable} must be {value}"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_environment_parses_into_the_requested_settings(name: str) -> None:
    values = value_set(name)
    with helm.Chart.load(CHART) as chart:
        merged = chart.merge_values(values)
    for label, _, container in baton_containers(render_objects(values)):
        env = literal_env(container)
        settings = Settings.from_env(env)  # raises on any value the code would reject
        role = container["args"][0]
        assert settings.role == role, f"{label}: BATON_ROLE does not match the entrypoint role"
        if role == "router":
            assert settings.host == "0.0.0.0"
            assert settings.http_port == merged["router"]["ports"]["http"]
            assert settings.grpc_port == merged["router"]["ports"]["grpc"]
            assert settings.routing_policy == merged["router"]["routingPolicy"]
            assert settings.block_size == merged["engine"]["blockSize"]
        else:
            assert settings.host == "10.1.2.3", f"{label}: must bind to the pod IP"
        if role in ("prefill", "decode", "ray-worker"):
            group = role if role != "ray-worker" else label.split("/")[1]
            assert settings.gpus_per_worker == merged[group]["gpusPerWorker"], label
            assert settings.worker_grpc_port == merged["workers"]["ports"]["grpc"]
            assert settings.metrics_port == merged["workers"]["ports"]["metrics"]
        if role != "ray-head" or merged["ray"]["mode"] == "kuberay":
            assert settings.redis_url, f"{label}: no placement store"
            assert settings.secret_file, f"{label}: no shared secret"


def test_kuberay_head_runs_the_launcher_with_role_resources() -> None:
    objs = render_objects(value_set("kuberay"))
    (cluster,) = find(objs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["args"] == ["ray-head", "baton", "up"]
    settings = Settings.from_env(literal_env(head))
    assert settings.ray_role_resources and settings.ray_address == "auto"
    assert (settings.num_prefill, settings.num_decode) == (1, 2)
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for role, group in groups.items():
        assert group["rayStartParams"]["resources"] == f'"{{\\"baton_{role}\\": 1}}"'
        assert group["rayStartParams"]["num-gpus"] == "1"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"source": "default"}, {}),
        ({"source": "hf", "name": "org/model"}, {"BATON_MODEL": "org/model"}),
        (
            {"source": "pvc", "name": "weights/m", "pvc": {"claimName": "w", "mountPath": "/models"}},
            {"BATON_MODEL": "/models/weights/m"},
        ),
        ({"source": "dummy"}, {"BATON_LOAD_FORMAT": "dummy"}),
        (
            {"source": "dummy", "name": "org/shape"},
            {"BATON_LOAD_FORMAT": "dummy", "BATON_MODEL": "org/shape"},
        ),
    ],
)
def test_model_source_maps_onto_baton_model(model: dict[str, Any], expected: dict[str, str]) -> None:
    for label, template, container in baton_containers(render_objects({"model": model})):
        if container["args"][0] == "ray-head":
            continue
        env = literal_env(container)
        got = {k: env[k] for k in ("BATON_MODEL", "BATON_LOAD_FORMAT") if k in env}
        assert got == expected, label
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == (["w"] if model["source"] == "pvc" else []), label


def test_role_model_override_applies_to_that_role_only() -> None:
    objs = render_objects({"model": {"source": "hf", "name": "org/base"}, "decode": {"model": "org/other"}})
    models = {
        container["args"][0]: literal_env(container).get("BATON_MODEL")
        for _, _, container in baton_containers(objs)
    }
    assert models["decode"] == "org/other"
    assert models["prefill"] == models["router"] == "org/base"


# --- resources, probes, placement ----------------------------------------------------------------


def test_gpus_per_worker_requests_nvidia_gpus_and_tolerates_gpu_taints() -> None:
    objs = render_objects(value_set("gpu"))
    for role in ("prefill", "decode"):
        (deployment,) = find(objs, "Deployment", f"baton-{role}")
        spec = deployment["spec"]["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    router = find(objs, "Deployment", "baton-router")[0]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in router["resources"].get("limits", {})
    cpu_worker = find(render_objects(), "Deployment", "baton-decode")[0]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_worker["containers"][0]["resources"]["limits"]
    assert "tolerations" not in cpu_worker


def test_probes_wait_for_weights_and_use_grpc_health_on_workers() -> None:
    objs = render_objects({"workers": {"startupTimeoutSeconds": 2400}})
    for role in ("prefill", "decode"):
        container = find(objs, "Deployment", f"baton-{role}")[0]["spec"]["template"]["spec"]["containers"][0]
        startup = container["startupProbe"]
        assert startup["grpc"]["port"] == 50061
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 2400
        assert container["readinessProbe"]["grpc"]["port"] == 50061
        assert container["livenessProbe"]["grpc"]["port"] == 50061
    router = find(objs, "Deployment", "baton-router")[0]["spec"]["template"]["spec"]["containers"][0]
    assert router["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "startupProbe" in router


def test_worker_pods_get_shared_memory_and_a_read_only_root() -> None:
    for label, template, container in baton_containers(render_objects(value_set("gpu"))):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, label
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, label
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/home/baton"} <= mounts, label
        if container["args"][0] in ("prefill", "decode"):
            assert "/dev/shm" in mounts and "/var/cache/baton" in mounts, label


# --- exposure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("service_type", ["ClusterIP", "NodePort", "LoadBalancer"])
@pytest.mark.parametrize("name", VALUE_SETS)
def test_router_is_the_only_service_that_can_be_exposed(name: str, service_type: str) -> None:
    values = value_set(name)
    values.setdefault("router", {}).setdefault("service", {})["type"] = service_type
    for service in find(render_objects(values), "Service"):
        kind = service["spec"].get("type", "ClusterIP")
        if service["metadata"]["labels"]["app.kubernetes.io/component"] == "router":
            assert kind == service_type
        else:
            assert kind == "ClusterIP", f"{service['metadata']['name']} must stay ClusterIP"


def _ingress_rules_for(labels: dict[str, str], policies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        rule
        for policy in policies
        if label_selector_matches(policy["spec"]["podSelector"], labels)
        for rule in policy["spec"].get("ingress", [])
    ]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_network_policy_admits_outsiders_only_to_the_router(name: str) -> None:
    objs = render_objects(value_set(name))
    policies = find(objs, "NetworkPolicy")
    release = {"app.kubernetes.io/name": "baton", "app.kubernetes.io/instance": "baton"}
    metrics_from = value_set(name).get("networkPolicy", {}).get("metricsFrom", [])
    templates = [t for o in objs for _, t in pod_templates(o)]
    assert templates
    for template in templates:
        labels = template["metadata"]["labels"]
        component = labels["app.kubernetes.io/component"]
        rules = _ingress_rules_for(labels, policies)
        assert rules, f"{component}: not covered by any NetworkPolicy"
        for rule in rules:
            peers = rule.get("from")
            ports = {p["port"] for p in rule.get("ports", [])}
            if peers is None:  # open to every source: only the router's public ports
                assert component == "router" and ports == {"http", "grpc"}, f"{component}: open rule {rule}"
            elif peers == metrics_from:
                assert ports == {"metrics"} and component in ("prefill", "decode")
            else:
                assert peers == [{"podSelector": {"matchLabels": release}}], f"{component}: peers {peers}"


def test_notes_tell_how_to_reach_the_router() -> None:
    notes = render()["baton/templates/NOTES.txt"]
    assert "port-forward service/baton-router 8000:8000" in notes
    assert "http://baton-router.llm.svc:8000" in notes and "WARNING" not in notes
    exposed = render(
        {"router": {"service": {"type": "LoadBalancer"}}, "metrics": {"podMonitor": {"enabled": True}}}
    )
    notes = exposed["baton/templates/NOTES.txt"]
    assert "status.loadBalancer.ingress" in notes and "port-forward" not in notes
    assert "networkPolicy.metricsFrom" in notes  # the scrape would be blocked: say so
