"""Container-style deployment on one host: ``baton worker`` x2 and ``baton router`` as separate
processes sharing a real redis-server placement store; the openai client gets an answer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from tests.e2e.serving import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (apt-get install redis-server)")


@pytest.fixture()
def redis_url():
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_workers_and_router_meet_in_redis(redis_url):
    http_port = free_port()
    env = dict(os.environ, BATON_SECRET="standalone-secret", BATON_REDIS_URL=redis_url, BATON_KV_PORT="0",
               BATON_GRPC_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    try:
        for role in ("decode", "prefill"):
            procs.append(subprocess.Popen([sys.executable, "-m", "baton", "worker", "--role", role, "--port", "0"],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for p in procs:
            deadline = time.time() + 180
            while time.time() < deadline:
                line = p.stdout.readline()
                if line.startswith("READY"):
                    break
                assert p.poll() is None, "worker exited"
        procs.append(subprocess.Popen([sys.executable, "-m", "baton", "router", "--port", str(http_port)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        client = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                resp = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                                      max_tokens=24, temperature=0)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        assert "Paris" in resp.choices[0].message.content
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
