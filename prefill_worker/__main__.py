"""Run one prefill worker as a process: ``python -m prefill_worker --model ... --port 0``.

Prints ``READY <grpc address>`` on stdout once serving; SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

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
    args = p.parse_args(argv)
    import os

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
    print(f"READY {address}", flush=True)
    stop.wait()
    server.stop(grace=2).wait()
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
