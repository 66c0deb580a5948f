"""CLI subcommands of the launcher: serve, up, status, scale, worker."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct); an HF folder, a .gguf file or dummy:<shape>")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--num-prefill", type=int, default=None, help="prefill workers (default 1)")
    p.add_argument("--num-decode", type=int, default=None, help="decode workers (default 1)")
    p.add_argument("--host", default=None, help="bind address of Baton's listeners (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=None, help="public gRPC port (default 50051)")
    p.add_argument("--redis-url", default=None, help="placement store (default: embedded, single host)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--routing-policy", default=None, help="cache-aware | least-loaded | round-robin")
    p.add_argument(
        "--first-token-from", default=None, choices=["prefill", "decode"],
        help="who streams a split request's first token (default prefill: lowest TTFT; decode: evenly spaced tokens)",
    )  # fmt: skip
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks per worker (default: from memory)")
    p.add_argument("--speculative", default=None, choices=["off", "ngram", "draft"], help="speculative decoding on decode workers")
    p.add_argument("--prefill-chunk", type=int, default=None, help="longest prefill chunk per step, in tokens (chunked prefill)")
    p.add_argument("--dashboard", action="store_true", default=None, help="start the Ray dashboard (off by default)")


def _settings(args: argparse.Namespace):
    from baton.settings import Settings, unknown_env_vars

    for name in unknown_env_vars():
        print(f"baton: warning: unknown environment variable {name}", file=sys.stderr)
    return Settings.from_env().override(
        model=args.model, dtype=args.dtype, num_prefill=args.num_prefill, num_decode=args.num_decode, host=args.host,
        http_port=args.port, grpc_port=args.grpc_port, redis_url=args.redis_url, block_size=args.block_size,
        max_model_len=args.max_model_len, routing_policy=args.routing_policy, gpus_per_worker=args.gpus_per_worker,
        dashboard=args.dashboard, speculative=args.speculative, first_token_from=args.first_token_from,
    )


def cmd_serve(args: argparse.Namespace, join_existing: bool = False) -> int:
    from baton.launcher.serve import ServeOptions, serve

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(args)
    # One line per finished request (route, workers, queue/prefill/transfer/TTFT/e2e times).
    logging.getLogger("router.trace").setLevel(settings.log_level.upper())
    opts = ServeOptions(settings, num_kv_blocks=args.num_kv_blocks, prefill_chunk_tokens=args.prefill_chunk, join_existing=join_existing)
    return asyncio.run(serve(opts))


def cmd_up(args: argparse.Namespace) -> int:
    if args.config:
        import yaml

        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
        ray_address = cfg.pop("ray_address", None)
        for key, value in cfg.items():
            attr = key.replace("-", "_")
            if not hasattr(args, attr):
                raise ValueError(f"{args.config}: unknown key {key!r}")
            if getattr(args, attr) is None:
                setattr(args, attr, value)
        if ray_address:
            os.environ["RAY_ADDRESS"] = ray_address
    # Token authentication stays on when joining (Ray reads this when it is imported).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    return cmd_serve(args, join_existing=True)


def _admin(url: str, path: str, body: dict | None = None) -> dict:
    from baton.launcher.admin import token_file

    port = int(url.rsplit(":", 1)[1].split("/")[0]) if url.count(":") >= 2 else 80
    token = os.environ.get("BATON_ADMIN_TOKEN")
    if token is None:
        try:
            token = token_file(port).read_text().strip()
        except OSError:
            raise ValueError(f"no admin token: set BATON_ADMIN_TOKEN or run on the machine that runs baton serve ({token_file(port)})") from None
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise ValueError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
    except urllib.error.URLError as e:
        raise ValueError(f"cannot reach {url}: {e.reason}") from None


def cmd_status(args: argparse.Namespace) -> int:
    data = _admin(args.url, "/admin/status")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Baton cluster at {args.url}  (prefill {data['counts']['prefill']}, decode {data['counts']['decode']})")
    for col in ("worker", "role", "address", "healthy", "running", "waiting", "KV usage", "prefix hits", "finished", "tokens"):
        table.add_column(col)
    for w in data["workers"]:
        table.add_row(
            w.get("worker_id", "?"), w["role"], w["address"], "yes" if w["healthy"] else f"no ({w.get('error', '')[:40]})",
            str(w.get("running", "")), str(w.get("waiting", "")), f"{w.get('kv_cache_usage', 0):.1%}",
            f"{w.get('prefix_hit_rate', 0):.1%}", str(w.get("finished_requests", "")), str(w.get("generated_tokens", "")),
        )
    Console().print(table)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    data = _admin(args.url, "/admin/scale", {"role": args.role, "count": args.count})
    print(f"prefill {data['counts']['prefill']}, decode {data['counts']['decode']}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from baton.launcher.standalone import run_worker
    from baton.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = Settings.from_env().override(model=args.model, host=args.host, worker_grpc_port=args.port, redis_url=args.redis_url)
    return asyncio.run(run_worker(s, args.role))


def cmd_router(args: argparse.Namespace) -> int:
    from baton.launcher.standalone import run_router
    from baton.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = Settings.from_env().override(model=args.model, host=args.host, http_port=args.port, redis_url=args.redis_url)
    return asyncio.run(run_router(s, args.model_fingerprint))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the whole cluster on this machine (Ray + workers + router)")
    _add_cluster_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("up", help="run Baton on an existing Ray cluster (RAY_ADDRESS)")
    _add_cluster_flags(p)
    p.add_argument("--config", default=None, help="cluster.yaml with the same keys as the flags (and ray_address)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="show the cluster: workers, load, KV usage, prefix hits")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("worker", help="run one prefill or decode worker (container deployments)")
    p.add_argument("--role", required=True, choices=["prefill", "decode"])
    p.add_argument("--model", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None, help="worker gRPC port (BATON_WORKER_GRPC_PORT)")
    p.add_argument("--redis-url", default=None, help="placement store to register in")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("router", help="run one router replica over a Redis placement store")
    p.add_argument("--model", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None, help="HTTP port")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--model-fingerprint", default=None, help="default: adopt the first decode worker's")
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("scale", help="set the number of prefill or decode workers (drains before removal)")
    p.add_argument("role", choices=["prefill", "decode"])
    p.add_argument("count", type=int)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.set_defaults(func=cmd_scale)
