"""``baton serve`` / ``baton up``: Ray + prefill and decode actors + the router, in one command.

Lifecycle: resolve the model (download once, with progress) -> start or join Ray -> start the
actors and wait for them (progress per worker) -> serve HTTP + gRPC -> keep the actors healthy and the
placement store current -> on SIGINT/SIGTERM: stop accepting, stop the actors, leave Ray.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass

import uvicorn

from baton.launcher.actors import WorkerSpec
from baton.launcher.admin import add_admin_routes, write_token
from baton.launcher.controller import ClusterController
from baton.settings import Settings
from baton.text import Tokenizer
from router.app import create_app
from router.cluster_backend import ClusterBackend, ClusterConfig
from router.config import RouterConfig
from router.grpc_server import create_grpc_server
from router.placement.base import PlacementStore
from router.placement.embedded import EmbeddedPlacementStore
from router.placement.redis_store import RedisPlacementStore
from router.policy import make_policy
from router.registrar import WorkerRegistrar

log = logging.getLogger("baton.launcher")
HEARTBEAT_TTL_S = 3.0
POLL_INTERVAL_S = 0.5


@dataclass(frozen=True)
class ServeOptions:
    settings: Settings
    device: str | None = None  # None: cuda when visible
    num_kv_blocks: int | None = None
    prefill_chunk_tokens: int | None = None
    join_existing: bool = False  # baton up: RAY_ADDRESS must name a running cluster


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _start_ray(s: Settings, opts: ServeOptions, workers: int) -> None:
    import ray

    address = s.ray_address or os.environ.get("RAY_ADDRESS", "")
    if opts.join_existing and not address:
        raise ValueError("baton up joins a running Ray cluster: set RAY_ADDRESS (or BATON_RAY_ADDRESS)")
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    kv_trace = os.environ.get("BATON_KV_TRACE", "")
    if kv_trace:  # per-piece transfer timings (kv_transfer/diag.py), printed by the workers
        env["BATON_KV_TRACE"] = kv_trace
    if s.step_trace:  # per-step timing files (engine/step_trace.py), one per worker
        env["BATON_STEP_TRACE"] = os.path.abspath(s.step_trace)
    runtime_env = {"env_vars": env}
    log_to_driver = bool(kv_trace)
    if address:
        _say(f"joining Ray cluster at {address}")
        node_ip = "127.0.0.1" if address.split(":")[0] in ("127.0.0.1", "localhost") else None
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver, _node_ip_address=node_ip)
    else:
        # Logical CPUs: one per worker actor plus the driver, whatever the core count (actors mostly wait).
        num_cpus = max(os.cpu_count() or 1, workers + 1)
        _say("starting a local Ray instance (dashboard off unless --dashboard)")
        # A one-machine cluster stays on loopback when Baton itself does.
        node_ip = "127.0.0.1" if s.host in ("127.0.0.1", "localhost") else None
        ray.init(num_cpus=num_cpus, include_dashboard=s.dashboard, runtime_env=runtime_env, log_to_driver=log_to_driver,
                 _node_ip_address=node_ip)


async def serve(opts: ServeOptions) -> int:
    import ray
    import torch

    from engine.model_source import resolve_model

    s = opts.settings
    secret = s.resolved_secret() or secrets.token_hex(24)  # internal peers authenticate with it
    from baton.launcher.standalone import model_spec

    spec_name = model_spec(s)
    source = resolve_model(spec_name)  # downloads the default model once, with a progress bar
    gpus = s.gpus_per_worker if s.gpus_per_worker is not None else (1.0 if torch.cuda.is_available() else 0.0)
    _start_ray(s, opts, s.num_prefill + s.num_decode)
    base = WorkerSpec(
        role="decode", worker_id="", model=spec_name, secret=secret, dtype=s.dtype, host=s.host,
        block_size=s.block_size, max_model_len=s.max_model_len or 4096, max_num_seqs=s.max_num_seqs or 64,
        max_num_batched_tokens=s.max_num_batched_tokens, num_kv_blocks=opts.num_kv_blocks,
        prefill_chunk_tokens=opts.prefill_chunk_tokens,
        speculative=None if s.speculative == "off" else s.speculative,
        gpu_memory_utilization=s.gpu_memory_utilization, transport=s.kv_transport,
        metrics_port=0,  # several workers per host: free ports (ready() reports them); the router shows all
    )
    controller = ClusterController(base, num_gpus_per_worker=gpus, role_resources=s.ray_role_resources)
    store: PlacementStore = (
        RedisPlacementStore.from_url(s.redis_url, password=s.resolved_redis_password() or None)
        if s.redis_url else EmbeddedPlacementStore()
    )
    registrar = WorkerRegistrar(store, ttl_s=HEARTBEAT_TTL_S, poll_interval_s=POLL_INTERVAL_S, secret=secret)
    loop = asyncio.get_running_loop()

    def on_new_incarnation(info: dict) -> None:
        registrar.forget(info["worker_id"])
        asyncio.run_coroutine_threadsafe(store.deregister(info["worker_id"]), loop)

    def on_removed(worker_id: str) -> None:
        asyncio.run_coroutine_threadsafe(store.deregister(worker_id), loop).result(5)

    controller.on_new_incarnation = on_new_incarnation
    controller.on_removed = on_removed
    _say(f"starting {s.num_prefill} prefill + {s.num_decode} decode worker(s) with {source.name} (loading weights)")
    try:
        await asyncio.to_thread(controller.start, s.num_prefill, s.num_decode, 900.0, _say)
        first = next(m.info for m in controller.members.values() if m.info)
        tokenizer_dir = first["tokenizer_dir"] or source.tokenizer_dir
        dummy = not tokenizer_dir
        if dummy:  # dummy weights: drive them with BATON_TOKENIZER or the default model's tokenizer
            tokenizer_dir = s.tokenizer or resolve_model(None).tokenizer_dir
            _say("no tokenizer with dummy weights: using the default model's tokenizer")
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        if dummy:
            tokenizer.cover_ids(first["vocab_size"])  # every sampled id streams as text
        backend = ClusterBackend(
            ClusterConfig(first["fingerprint"], first["block_size"], first["max_model_len"], vocab_size=first["vocab_size"], secret=secret, first_token_from=s.first_token_from),
            store,
            make_policy(s.routing_policy, 64 if s.local_prefill_threshold is None else s.local_prefill_threshold),
        )
        config = RouterConfig(first["model_name"], max_model_len=first["max_model_len"], otlp_endpoint=s.otlp_endpoint)
        app = create_app(config, backend, store, tokenizer)
        registrar.on_info = app.state.metrics.workers.observe  # worker snapshots in the router's /metrics
        add_admin_routes(app, controller, secret)
        http = uvicorn.Server(uvicorn.Config(app, host=s.host, port=s.http_port, log_level="warning"))
        http.install_signal_handlers = lambda: None
        grpc_server = create_grpc_server(config, backend, tokenizer, app.state.metrics)
        await registrar.poll_once(controller.targets())
        return await _run(s, opts, http, grpc_server, controller, registrar, config, secret)
    finally:
        _say("shutting down: stopping workers")
        await asyncio.to_thread(controller.shutdown)
        await store.close()
        ray.shutdown()
        _say("stopped")


async def _run(s, opts, http, grpc_server, controller, registrar, config, secret) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            raise RuntimeError(f"the HTTP server could not start on {s.host}:{s.http_port}")
        await asyncio.sleep(0.05)
    grpc_port = await grpc_server.start(f"{s.host}:{s.grpc_port}")
    write_token(s.http_port, secret)
    _banner(s, config.served_model_name, grpc_port, secret)

    async def keep_registered() -> None:
        while True:
            await registrar.poll_once(controller.targets())
            await asyncio.sleep(POLL_INTERVAL_S)

    async def keep_healthy() -> None:
        while True:
            await asyncio.to_thread(controller.check)
            await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(keep_registered()), asyncio.create_task(keep_healthy())]
    try:
        await stop.wait()
    finally:
        _say("draining: no new requests")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await grpc_server.stop()
        http.should_exit = True
        await http_task
    return 0


def _banner(s: Settings, model: str, grpc_port: int, secret: str) -> None:
    base = f"http://{s.host}:{s.http_port}"
    _say(
        f"""
Baton is serving {model}
  OpenAI API   {base}/v1      (health {base}/health, metrics {base}/metrics)
  gRPC         {s.host}:{grpc_port}  (baton.v1.RouterService, health, reflection)
  status       baton status --url {base}

Try it:
  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{base}/v1', api_key='none'); \\
print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi!'}}]).choices[0].message.content)"

Ctrl-C stops everything.
"""
    )
