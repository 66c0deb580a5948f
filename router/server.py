"""Run one router replica: HTTP (OpenAI API) and gRPC (RouterService + health + reflection) in one
event loop, over a ``ClusterBackend`` and a placement store (Redis when a URL is given, else embedded).

Shared settings (ports, Redis, block size, policy, ...) come from ``baton.settings`` (``BATON_*``),
flags override them; see ``python -m router -h``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from baton.settings import Settings
from baton.text import Tokenizer
from router.app import create_app
from router.cluster_backend import ClusterBackend, ClusterConfig
from router.config import RouterConfig
from router.grpc_server import create_grpc_server
from router.placement.base import PlacementStore, WorkerRole
from router.placement.embedded import EmbeddedPlacementStore
from router.placement.redis_store import RedisPlacementStore
from router.policy import make_policy
from router.registrar import WorkerRegistrar

log = logging.getLogger("router")


@dataclass(frozen=True)
class ServerSettings:
    tokenizer_dir: str
    served_model_name: str
    model_fingerprint: str
    block_size: int
    max_model_len: int
    redis_url: str | None
    redis_password: str
    workers: tuple[tuple[str, WorkerRole], ...]  # polled with GetInfo (optional)
    host: str
    http_port: int
    grpc_port: int
    policy: str
    local_prefill_threshold: int
    otlp_endpoint: str = ""  # BATON_OTLP_ENDPOINT: request traces as OpenTelemetry spans
    first_token_from: str = "prefill"  # BATON_FIRST_TOKEN_FROM (see router.cluster_backend)
    secret: str = field(default="", repr=False)  # BATON_SECRET(_FILE): the workers authenticate us with it


def parse_workers(spec: str) -> tuple[tuple[str, WorkerRole], ...]:
    """``"decode@10.0.0.5:7000,prefill@10.0.0.6:7000"`` -> ((address, role), ...)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        role, sep, address = item.partition("@")
        if not sep or role not in ("prefill", "decode") or ":" not in address:
            raise argparse.ArgumentTypeError(
                f"bad worker {item!r}; expected prefill@host:port or decode@host:port"
            )
        out.append((address, WorkerRole(role)))
    return tuple(out)


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Shared settings come from ``baton.settings`` (``BATON_*``; flags override); the router-only
    inputs below have no environment variable of their own."""
    env = Settings.from_env(environ)
    p = argparse.ArgumentParser(prog="python -m router", description=__doc__.splitlines()[0])
    p.add_argument(
        "--tokenizer", default=env.model if Path(env.model).is_dir() else None, help="tokenizer folder"
    )
    p.add_argument("--served-model-name", default=None, help="default: the model folder's name")
    p.add_argument(
        "--model-fingerprint", required=True, help="engine.config.model_fingerprint() of the model"
    )
    p.add_argument("--workers", type=parse_workers, default=(), help="decode@host:port,prefill@host:port,...")
    p.add_argument("--block-size", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--redis-url")
    p.add_argument("--host")
    p.add_argument("--http-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--routing-policy")
    p.add_argument("--local-prefill-threshold", type=int)
    a = p.parse_args(argv)
    if a.tokenizer is None:
        p.error("--tokenizer is required unless BATON_MODEL names a local folder")
    try:
        s = env.override(
            block_size=a.block_size, max_model_len=a.max_model_len, redis_url=a.redis_url, host=a.host,
            http_port=a.http_port, grpc_port=a.grpc_port, routing_policy=a.routing_policy,
            local_prefill_threshold=a.local_prefill_threshold,
        )  # fmt: skip
    except ValueError as err:
        p.error(str(err))
    if s.max_model_len is None:
        p.error("--max-model-len (or BATON_MAX_MODEL_LEN) is required: the router validates before any work")
    return ServerSettings(
        tokenizer_dir=a.tokenizer,
        served_model_name=a.served_model_name or Path(a.tokenizer).resolve().name,
        model_fingerprint=a.model_fingerprint,
        block_size=s.block_size,
        max_model_len=s.max_model_len,
        redis_url=s.redis_url or None,
        redis_password=s.resolved_redis_password(),
        workers=a.workers,
        host=s.host,
        http_port=s.http_port,
        grpc_port=s.grpc_port,
        policy=s.routing_policy,
        local_prefill_threshold=64 if s.local_prefill_threshold is None else s.local_prefill_threshold,
        otlp_endpoint=s.otlp_endpoint,
        first_token_from=s.first_token_from,
        secret=s.resolved_secret(),
    )


async def serve(s: ServerSettings) -> None:
    tokenizer = Tokenizer.from_dir(s.tokenizer_dir)
    store: PlacementStore = (
        RedisPlacementStore.from_url(s.redis_url, password=s.redis_password or None)
        if s.redis_url
        else EmbeddedPlacementStore()
    )
    cluster = ClusterConfig(
        s.model_fingerprint,
        s.block_size,
        s.max_model_len,
        vocab_size=tokenizer.vocab_size,
        secret=s.secret,
        first_token_from=s.first_token_from,
    )
    backend = ClusterBackend(cluster, store, make_policy(s.policy, s.local_prefill_threshold))
    config = RouterConfig(s.served_model_name, max_model_len=s.max_model_len, otlp_endpoint=s.otlp_endpoint)
    app = create_app(config, backend, store, tokenizer)
    http = uvicorn.Server(uvicorn.Config(app, host=s.host, port=s.http_port, log_level="info"))
    http.install_signal_handlers = lambda: None  # signals are handled below, for both servers
    grpc_server = create_grpc_server(config, backend, tokenizer, app.state.metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http_task = asyncio.create_task(http.serve())  # its lifespan starts the backend
    tasks: list[asyncio.Task] = []
    try:
        while not http.started:
            if http_task.done():
                raise RuntimeError("the HTTP server failed to start")
            await asyncio.sleep(0.05)
        port = await grpc_server.start(f"{s.host}:{s.grpc_port}")
        log.info("router serving HTTP on %s:%d and gRPC on %s:%d", s.host, s.http_port, s.host, port)
        if s.workers:
            registrar = WorkerRegistrar(store, secret=s.secret, on_info=app.state.metrics.workers.observe)
            tasks.append(asyncio.create_task(registrar.poll(s.workers)))
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await grpc_server.stop()
        http.should_exit = True
        await http_task


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(parse_args(argv)))
