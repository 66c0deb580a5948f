"""``baton up --config cluster.yaml`` joins a running Ray cluster (here: a local head started with
``ray start``), serves, and on Ctrl-C leaves the cluster itself running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from tests.e2e.serving import free_port, ray_processes


@pytest.fixture()
def ray_head():
    assert not ray_processes(), f"Ray already running here: {ray_processes()}"
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token")
    # A head with token auth needs a token; a fresh machine has none until one is generated.
    subprocess.run(["ray", "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60, env=env)
    subprocess.run(["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True, timeout=120, env=env)
    yield f"127.0.0.1:{port}"
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)


def test_baton_up_joins_existing_cluster(ray_head, tmp_path):
    http_port, grpc_port = free_port(), free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"ray_address": ray_head, "num_prefill": 1, "num_decode": 1, "port": http_port,
                                      "grpc_port": grpc_port, "model": "dummy:tiny-llama"}))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "baton", "up", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            assert time.time() < deadline, "baton up did not become healthy"
            time.sleep(1)
        assert "joining Ray cluster" in (tmp_path / "up.log").read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
        # The cluster we joined is not ours to stop: its head is still there.
        assert any("gcs_server" in p for p in ray_processes())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
