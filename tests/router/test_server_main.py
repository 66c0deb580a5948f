"""``python -m router`` as a real process: starts both servers, polls a worker into its embedded store,
turns healthy, serves a completion through gRPC to the (fake) worker, and exits cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.router.conftest import free_port
from tests.router.fake_workers import TOKEN_BASE, FakeDecode, WorkerServer

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]


async def wait_until(check, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            if await check():
                return
        except (httpx.TransportError, grpc.aio.AioRpcError):
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("not ready before the deadline")
        await asyncio.sleep(0.1)


async def test_router_process(tokenizer_dir, tokenizer, tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    log_file = (tmp_path / "router.log").open("wb")  # a file, not a pipe: a full pipe would block it
    # The worker refuses callers without the shared secret, as real workers do.
    async with WorkerServer(FakeDecode("d0", secret="router-test-secret")) as worker:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "BATON_ROUTING_POLICY": "least-loaded",
            "BATON_SECRET": "router-test-secret",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "--tokenizer", str(tokenizer_dir), "--served-model-name", "m",
            "--model-fingerprint", "fp", "--max-model-len", "256", "--block-size", "4", "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--workers", f"decode@{worker.address}",
            cwd=REPO, env=env, stdout=log_file, stderr=log_file,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{http_port}"
            async with httpx.AsyncClient(timeout=5) as http:
                await wait_until(lambda: _status_is(http, base + "/health", 200))
                r = await http.post(
                    base + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3}
                )
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == tokenizer.decode(
                    [TOKEN_BASE, TOKEN_BASE + 1, TOKEN_BASE + 2]
                )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
        except BaseException:
            print((tmp_path / "router.log").read_text())
            raise
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            log_file.close()


async def _status_is(http: httpx.AsyncClient, url: str, status: int) -> bool:
    return (await http.get(url)).status_code == status


def test_parse_args_reads_shared_settings_and_flags(tokenizer_dir) -> None:
    from router.placement import WorkerRole
    from router.server import parse_args

    env = {"BATON_MODEL": str(tokenizer_dir), "BATON_MAX_MODEL_LEN": "512", "BATON_HTTP_PORT": "9000"}
    s = parse_args(
        ["--model-fingerprint", "fp", "--http-port", "9100", "--workers", "decode@h:1,prefill@h:2"], env
    )
    assert (s.tokenizer_dir, s.max_model_len, s.http_port, s.block_size) == (
        str(tokenizer_dir),
        512,
        9100,
        16,
    )
    assert s.workers == (("h:1", WorkerRole.DECODE), ("h:2", WorkerRole.PREFILL))
    assert s.policy == "cache-aware" and s.redis_url is None and s.secret == ""
    assert parse_args(["--model-fingerprint", "fp"], {**env, "BATON_SECRET": "x"}).secret == "x"
    with pytest.raises(SystemExit):  # no max model len anywhere
        parse_args(["--model-fingerprint", "fp", "--tokenizer", str(tokenizer_dir)], {})
    with pytest.raises(SystemExit):
        parse_args(["--model-fingerprint", "fp", "--workers", "gpu@h:1"], env)
