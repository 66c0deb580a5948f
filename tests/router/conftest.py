"""Shared fixtures of the router tests: a real redis-server, async test backend."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.router.router_testkit import FakeBackend, serve


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # Session scope: every async test shares one event loop, as grpc.aio binds its poller to a loop.
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port for the whole session, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found on PATH (install the redis-server package)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    from tests.router.router_testkit import build_tokenizer_dir

    return build_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from baton.text import Tokenizer

    return Tokenizer.from_dir(tokenizer_dir)


@dataclass
class RunningRouter:
    url: str
    backend: FakeBackend
    app: object
    http: httpx.Client  # one client per module: creating one per request costs ~0.1 s


@pytest.fixture(scope="module")
def running_router(tokenizer) -> Iterator[RunningRouter]:
    """The real app on uvicorn (127.0.0.1, free port) over a deterministic fake backend."""
    from router.app import create_app
    from router.config import RouterConfig
    from router.placement import EmbeddedPlacementStore

    backend = FakeBackend(tokenizer)
    config = RouterConfig("baton-test", max_body_bytes=64 * 1024, request_timeout_s=20.0)
    app = create_app(config, backend, EmbeddedPlacementStore(), tokenizer)
    with serve(app) as url, httpx.Client(timeout=20) as http:
        yield RunningRouter(url, backend, app, http)


@pytest.fixture
def router(running_router: RunningRouter) -> RunningRouter:
    """The module's router with its fake backend reset to defaults."""
    b = running_router.backend
    b.token_delay_s, b.fail_after, b.is_ready = 0.0, None, True
    b.requests.clear()
    b.aborted.clear()
    b.finished.clear()
    return running_router
