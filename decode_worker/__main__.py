"""Run one decode worker as a process: ``python -m decode_worker --model ... --port 0``.

Prints ``READY <grpc address>`` on stdout once serving; SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from baton.convert import worker_info
from baton.v1 import common_pb2
from baton.worker_metrics import metrics_port_from_env, serve_worker_metrics
from decode_worker.config import DecodeWorkerConfig
from decode_worker.service import serve
from decode_worker.worker import DecodeWorker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m decode_worker")
    p.add_argument("--worker-id", default="decode-0")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--transport", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=256, help="longest local-prefill chunk per step")
    p.add_argument("--kv-port", type=int, default=0)
    p.add_argument("--secret-env", default="BATON_SECRET", help="environment variable holding the shared secret")
    p.add_argument("--metrics-port", type=int, default=metrics_port_from_env(), help="serve Prometheus /metrics here (0: a free port; default BATON_METRICS_PORT, else off)")
    p.add_argument("--speculative", choices=["ngram", "draft"], default=None, help="speculative decoding: n-gram lookup or a draft model (default off)")
    p.add_argument("--draft-model", default=None, help="draft model for --speculative draft (same vocabulary; default: the target model)")
    p.add_argument("--draft-seed", type=int, default=None, help="weights seed of a dummy draft model (default: the target's)")
    p.add_argument("--num-speculative-tokens", type=int, default=8, help="most draft tokens per request per step")
    p.add_argument("--no-adaptive-speculation", action="store_true", help="always draft the most tokens (no cost model)")
    p.add_argument("--log-level", default=os.environ.get("BATON_LOG_LEVEL") or "warning", help="debug | info | warning | error (default BATON_LOG_LEVEL, else warning)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = DecodeWorkerConfig(
        worker_id=args.worker_id, model=args.model, dtype=args.dtype, device=args.device, host=args.host,
        grpc_port=args.port, transport=args.transport, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len, prefill_chunk_tokens=args.chunk, kv_port=args.kv_port, secret=os.environ.get(args.secret_env, ""),
        speculative=args.speculative, draft_model=args.draft_model, draft_seed=args.draft_seed, num_speculative_tokens=args.num_speculative_tokens,
        adaptive_speculation=not args.no_adaptive_speculation,
    )
    worker = DecodeWorker(cfg)
    server, address = serve(worker, cfg.host, cfg.grpc_port, cfg.secret)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = None
    if args.metrics_port is not None:
        snapshot = lambda: worker_info(worker, common_pb2.WORKER_ROLE_DECODE, address, worker.kv_address)  # noqa: E731
        metrics = serve_worker_metrics(snapshot, cfg.host, args.metrics_port)
        print(f"METRICS {metrics.address}", flush=True)
    print(f"READY {address}", flush=True)
    stop.wait()
    if metrics is not None:
        metrics.close()
    server.stop(grace=2).wait()
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
