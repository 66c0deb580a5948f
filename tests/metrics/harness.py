"""Helpers of the metrics tests: worker processes that serve /metrics, exposition parsing, trace lines."""

from __future__ import annotations

import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.workers.cluster import WorkerProcess

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class MetricsWorker(WorkerProcess):
    """A real worker process started with ``--metrics-port 0``; remembers where /metrics is served and
    keeps reading its stderr (so its log lines can be checked and the pipe never fills)."""

    def __init__(self, role: str, model: str, *extra: str) -> None:
        self.metrics_address = ""
        self.log_lines: list[str] = []
        super().__init__(role, model, "--metrics-port", "0", *extra)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _wait_ready(self, timeout: float = 180.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("METRICS "):
                self.metrics_address = line.split()[1]
            elif line.startswith("READY "):
                return line.split()[1]
            elif self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} worker exited: {self.proc.stderr.read()[-3000:]}")
        raise TimeoutError(f"{self.role} worker did not start")

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log_lines.append(line.rstrip("\n"))

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as resp:
            assert resp.status == 200
            return resp.read().decode()


def block_bytes(layout) -> int:
    """Bytes of one KV block across all layers, K and V (from a ``baton.v1.KVLayout``)."""
    return (
        2
        * layout.num_layers
        * layout.block_size
        * layout.num_kv_heads
        * layout.head_dim
        * DTYPE_BYTES[layout.dtype]
    )


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels without model_name) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def worker_labels(worker_id: str, role: str, **extra: str) -> tuple:
    return tuple(sorted({"worker_id": worker_id, "role": role, **extra}.items()))


def trace_fields(line: str) -> dict[str, str]:
    """``key=value key=value`` -> dict."""
    return dict(item.split("=", 1) for item in line.split())
