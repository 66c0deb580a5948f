"""baton.settings: the one place every BATON_* variable is read, parsed and validated."""

from __future__ import annotations

import dataclasses

import pytest

from baton.settings import ENV_DOCS, ENV_VARS, Settings, env_name, unknown_env_vars


def test_defaults_are_the_documented_ones() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.model, s.dtype, s.role, s.host) == ("SmolLM2-135M-Instruct", "auto", "serve", "127.0.0.1")
    assert (s.http_port, s.grpc_port, s.worker_grpc_port, s.kv_port) == (8000, 50051, 50061, 50071)
    assert (s.num_prefill, s.num_decode, s.block_size, s.gpu_memory_utilization) == (1, 1, 16, 0.9)
    assert s.redis_url == "" and s.dashboard is False and s.gpus_per_worker is None
    assert (s.kv_transport, s.routing_policy, s.speculative) == ("auto", "cache-aware", "off")


def test_every_type_is_parsed_from_its_variable() -> None:
    s = Settings.from_env(
        {
            "BATON_MODEL": "org/model",
            "BATON_DTYPE": "BFloat16",
            "BATON_ROLE": "decode",
            "BATON_HOST": "10.0.0.7",
            "BATON_HTTP_PORT": " 9000 ",
            "BATON_METRICS_PORT": "9090",
            "BATON_MAX_MODEL_LEN": "4096",
            "BATON_GPUS_PER_WORKER": "0.5",
            "BATON_GPU_MEMORY_UTILIZATION": "0.85",
            "BATON_DASHBOARD": "on",
            "BATON_RAY_ROLE_RESOURCES": "TRUE",
            "BATON_REDIS_URL": "rediss://redis:6380/1",
            "BATON_ROUTING_POLICY": "least-loaded",
            "BATON_LOCAL_PREFILL_THRESHOLD": "0",
        }
    )
    assert (s.model, s.dtype, s.role, s.host) == ("org/model", "bfloat16", "decode", "10.0.0.7")
    assert (s.http_port, s.metrics_port, s.max_model_len) == (9000, 9090, 4096)
    assert (s.gpus_per_worker, s.gpu_memory_utilization) == (0.5, 0.85)
    assert s.dashboard is True and s.ray_role_resources is True
    assert (s.redis_url, s.routing_policy, s.local_prefill_threshold) == (
        "rediss://redis:6380/1",
        "least-loaded",
        0,
    )


def test_empty_and_auto_mean_default() -> None:
    s = Settings.from_env(
        {"BATON_HTTP_PORT": "", "BATON_MAX_NUM_SEQS": "auto", "BATON_GPUS_PER_WORKER": "AUTO"}
    )
    assert s.http_port == 8000 and s.max_num_seqs is None and s.gpus_per_worker is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"BATON_HTTP_PORT": "abc"}, "BATON_HTTP_PORT='abc': expected an integer"),
        ({"BATON_HTTP_PORT": "70000"}, "BATON_HTTP_PORT (http_port) = 70000: must be a port number"),
        ({"BATON_KV_PORT": "-1"}, "BATON_KV_PORT"),
        ({"BATON_GPU_MEMORY_UTILIZATION": "lots"}, "BATON_GPU_MEMORY_UTILIZATION='lots': expected a number"),
        ({"BATON_GPU_MEMORY_UTILIZATION": "1.2"}, "must be in (0, 1]"),
        ({"BATON_ROLE": "leader"}, "BATON_ROLE (role) = 'leader': must be one of serve, router"),
        ({"BATON_KV_TRANSPORT": "rdma"}, "BATON_KV_TRANSPORT"),
        ({"BATON_DASHBOARD": "maybe"}, "BATON_DASHBOARD='maybe': expected one of on/off"),
        ({"BATON_NUM_DECODE": "0"}, "BATON_NUM_DECODE (num_decode) = 0: must be >= 1"),
        ({"BATON_BLOCK_SIZE": "0"}, "BATON_BLOCK_SIZE"),
        (
            {"BATON_REDIS_URL": "redis.svc:6379"},
            "BATON_REDIS_URL (redis_url) = 'redis.svc:6379': must start with",
        ),
        ({"BATON_SECRET": "x", "BATON_SECRET_FILE": "/run/s"}, "not both"),
        ({"BATON_REDIS_PASSWORD": "x", "BATON_REDIS_PASSWORD_FILE": "/run/p"}, "not both"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Settings.from_env(environ)
    assert message in str(info.value)


def test_secrets_are_never_shown() -> None:
    s = Settings.from_env({"BATON_SECRET": "hunter2", "BATON_REDIS_PASSWORD": "swordfish"})
    assert "hunter2" not in repr(s) and "swordfish" not in repr(s)
    with pytest.raises(ValueError) as info:
        s.override(secret=12345)
    assert "12345" not in str(info.value) and "<redacted>" in str(info.value)


def test_ray_address_falls_back_to_ray_s_own_variable() -> None:
    assert Settings.from_env({"RAY_ADDRESS": "head:6379"}).ray_address == "head:6379"
    both = {"RAY_ADDRESS": "head:6379", "BATON_RAY_ADDRESS": "other:6379"}
    assert Settings.from_env(both).ray_address == "other:6379"


def test_secret_files_are_read_and_checked(tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    s = Settings.from_env({"BATON_SECRET_FILE": str(secret)})
    assert s.secret == "" and s.resolved_secret() == "s3cr3t"
    assert Settings.from_env({"BATON_SECRET": "inline"}).resolved_secret() == "inline"
    assert Settings().resolved_secret() == ""
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="BATON_SECRET_FILE=.*empty"):
        Settings(secret_file=str(tmp_path / "empty")).resolved_secret()
    with pytest.raises(ValueError, match="BATON_REDIS_PASSWORD_FILE=.*cannot read"):
        Settings(redis_password_file=str(tmp_path / "missing")).resolved_redis_password()


def test_cli_overrides_win_and_are_validated_the_same_way() -> None:
    env = Settings.from_env({"BATON_HTTP_PORT": "9000", "BATON_LOG_LEVEL": "debug"})
    s = env.override(http_port=8080, log_level=None)  # None: the flag was not given
    assert s.http_port == 8080 and s.log_level == "debug"
    with pytest.raises(ValueError, match="BATON_HTTP_PORT \\(http_port\\) = '80': expected int"):
        env.override(http_port="80")
    with pytest.raises(ValueError, match="BATON_DASHBOARD \\(dashboard\\) = 1: expected bool"):
        env.override(dashboard=1)
    with pytest.raises(ValueError, match="expected int, got bool"):
        env.override(num_prefill=True)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().http_port = 1  # type: ignore[misc]


def test_to_env_round_trips_whatever_the_surrounding_environment() -> None:
    s = Settings(
        model="org/m",
        role="prefill",
        http_port=0,
        metrics_port=9090,
        gpus_per_worker=1.0,
        dashboard=True,
        max_num_seqs=None,
        secret_file="/run/s",
        ray_address="head:6379",
    )
    env = s.to_env()
    assert set(env) == ENV_VARS - {"RAY_ADDRESS"}
    noisy = {"BATON_MAX_NUM_SEQS": "7", "BATON_HTTP_PORT": "1234", "RAY_ADDRESS": "elsewhere:1"}
    assert Settings.from_env({**noisy, **env}) == s


def test_env_vars_are_derived_from_the_fields() -> None:
    fields = dataclasses.fields(Settings)
    primary = {env_name(f.name) for f in fields}
    assert ENV_VARS == primary | {"RAY_ADDRESS"}
    assert all(name.startswith("BATON_") for name in primary)
    assert list(ENV_DOCS) == [env_name(f.name) for f in fields]
    assert all(ENV_DOCS.values())
    required = {
        "BATON_MODEL", "BATON_DTYPE", "BATON_ROLE", "BATON_HOST", "BATON_HTTP_PORT", "BATON_GRPC_PORT",
        "BATON_WORKER_GRPC_PORT", "BATON_KV_PORT", "BATON_REDIS_URL", "BATON_SECRET", "BATON_SECRET_FILE",
        "BATON_NUM_PREFILL", "BATON_NUM_DECODE", "BATON_GPUS_PER_WORKER", "BATON_BLOCK_SIZE",
        "BATON_MAX_MODEL_LEN", "BATON_MAX_NUM_SEQS", "BATON_MAX_NUM_BATCHED_TOKENS",
        "BATON_GPU_MEMORY_UTILIZATION", "BATON_KV_TRANSPORT", "BATON_ROUTING_POLICY",
        "BATON_LOCAL_PREFILL_THRESHOLD", "BATON_SPECULATIVE", "BATON_LOG_LEVEL", "BATON_CACHE_DIR",
        "BATON_RAY_ADDRESS", "BATON_DASHBOARD", "BATON_OTLP_ENDPOINT", "BATON_METRICS_PORT",
    }  # fmt: skip
    assert required <= ENV_VARS


def test_unknown_baton_variables_are_reported() -> None:
    environ = {"BATON_HTTP_PROT": "1", "BATON_MODEL": "m", "PATH": "/bin", "BATON_SECRET": "x"}
    assert unknown_env_vars(environ) == ["BATON_HTTP_PROT"]


def test_settings_module_stays_importable_by_the_router() -> None:
    # The router must not import torch or ray; settings is stdlib-only.
    import ast
    import inspect

    import baton.settings

    tree = ast.parse(inspect.getsource(baton.settings))
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "os", "collections", "dataclasses", "types", "typing"}
