"""``baton worker`` and ``baton router``: one component per process, for container deployments.

A standalone worker serves its gRPC API and, when a Redis placement store is configured, publishes
itself there (registration, heartbeats, KV events) so router replicas anywhere find it. A standalone
router serves HTTP + gRPC over the store; unless given a fingerprint, it adopts the one of the first
decode worker that registers (all workers of a deployment serve one model).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from baton.settings import Settings

log = logging.getLogger("baton.launcher")


def model_spec(s: Settings) -> str:
    """``BATON_MODEL`` + ``BATON_LOAD_FORMAT`` -> an engine model spec."""
    if s.load_format == "dummy" and not s.model.startswith("dummy:"):
        return f"dummy:{s.model}"
    return s.model


def _store(s: Settings):
    from router.placement.embedded import EmbeddedPlacementStore
    from router.placement.redis_store import RedisPlacementStore

    if s.redis_url:
        return RedisPlacementStore.from_url(s.redis_url, password=s.resolved_redis_password() or None)
    return EmbeddedPlacementStore()


async def run_worker(s: Settings, role: str) -> int:
    from baton.launcher.actors import WorkerActor, WorkerSpec
    from router.placement.base import WorkerRole
    from router.registrar import WorkerRegistrar

    secret = s.resolved_secret()
    if not secret:
        raise ValueError("a worker needs the shared secret (BATON_SECRET or BATON_SECRET_FILE)")
    spec = WorkerSpec(
        role=role, worker_id="", model=model_spec(s), secret=secret, dtype=s.dtype, host=s.host,
        grpc_port=s.worker_grpc_port, kv_port=s.kv_port, block_size=s.block_size, max_model_len=s.max_model_len or 4096,
        max_num_seqs=s.max_num_seqs or 64, max_num_batched_tokens=s.max_num_batched_tokens,
        gpu_memory_utilization=s.gpu_memory_utilization, transport=s.kv_transport,
        speculative=None if s.speculative == "off" or role != "decode" else s.speculative,
        metrics_port=s.metrics_port,  # one worker per container: the chart's PodMonitor scrapes this port
    )
    actor = await asyncio.to_thread(WorkerActor, spec)
    info = actor.ready()
    print(f"READY {info['address']}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = []
    store = None
    if s.redis_url:
        store = _store(s)
        registrar = WorkerRegistrar(store, ttl_s=10.0, poll_interval_s=2.0, secret=secret)
        tasks.append(asyncio.create_task(registrar.poll([(info["address"], WorkerRole(role))])))
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        if store is not None:
            await store.deregister(info["worker_id"])
            await store.close()
        actor.stop()
    return 0


async def run_router(s: Settings, fingerprint: str | None) -> int:
    import uvicorn

    from baton.text import Tokenizer
    from engine.model_source import resolve_model
    from router.app import create_app
    from router.cluster_backend import ClusterBackend, ClusterConfig
    from router.config import RouterConfig
    from router.grpc_server import create_grpc_server
    from router.placement.base import WorkerRole
    from router.policy import make_policy

    store = _store(s)
    source = resolve_model(model_spec(s))
    tokenizer = Tokenizer.from_dir(source.tokenizer_dir or s.tokenizer or resolve_model(None).tokenizer_dir)
    first = None
    while first is None:  # the model's identity, from the first decode worker of the deployment
        workers = [w for w in await store.live_workers() if w.role == WorkerRole.DECODE and (fingerprint is None or w.model_fingerprint == fingerprint)]
        if workers:
            first = workers[0]
            break
        log.warning("waiting for a decode worker to register in the placement store")
        await asyncio.sleep(2.0)
    threshold = 64 if s.local_prefill_threshold is None else s.local_prefill_threshold
    backend = ClusterBackend(
        ClusterConfig(first.model_fingerprint, first.block_size, first.max_model_len, vocab_size=tokenizer.vocab_size, secret=s.resolved_secret(), first_token_from=s.first_token_from),
        store, make_policy(s.routing_policy, threshold),
    )
    config = RouterConfig(first.model_name or source.name, max_model_len=first.max_model_len, otlp_endpoint=s.otlp_endpoint)
    app = create_app(config, backend, store, tokenizer)
    http = uvicorn.Server(uvicorn.Config(app, host=s.host, port=s.http_port, log_level=s.log_level))
    http.install_signal_handlers = lambda: None
    grpc_server = create_grpc_server(config, backend, tokenizer, app.state.metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(http.serve())
    while not http.started:
        if task.done():
            raise RuntimeError(f"the HTTP server could not start on {s.host}:{s.http_port}")
        await asyncio.sleep(0.05)
    await grpc_server.start(f"{s.host}:{s.grpc_port}")
    print(f"router serving {config.served_model_name} on http://{s.host}:{s.http_port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await grpc_server.stop()
        http.should_exit = True
        await task
    return 0
