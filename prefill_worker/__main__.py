"""Run one prefill worker as a process: ``python -m prefill_worker --model ... --port 0``.

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
from prefill_worker.config import PrefillWorkerConfig
from prefill_worker.service import serve
from prefill_worker.worker import PrefillWorker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prefill_worker")
    p.add_argument("--worker-id", default="prefill-0")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--transport", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=512, help="longest prefill chunk per step")
    p.add_argument("--secret-env", default="BATON_SECRET", help="environment variable holding the shared secret")
    p.add_argument("--metrics-port", type=int, default=metrics_port_from_env(), help="serve Prometheus /metrics here (0: a free port; default BATON_METRICS_PORT, else off)")
    p.add_argument("--log-level", default=os.environ.get("BATON_LOG_LEVEL") or "warning", help="debug | info | warning | error (default BATON_LOG_LEVEL, else warning)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = PrefillWorkerConfig(
        worker_id=args.worker_id, model=args.model, dtype=args.dtype, device=args.device, host=args.host,
        grpc_port=args.port, transport=args.transport, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len, prefill_chunk_tokens=args.chunk, secret=os.environ.get(args.secret_env, ""),
    )
    worker = PrefillWorker(cfg)
    server, address = serve(worker, cfg.host, cfg.grpc_port, cfg.secret)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = None
    if args.metrics_port is not None:
        snapshot = lambda: worker_info(worker, common_pb2.WORKER_ROLE_PREFILL, address, "")  # noqa: E731
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
