"""Per-step timing lines for diagnosing latency: ``BATON_STEP_TRACE=<folder>`` makes every engine host
write one tab-separated line per step to ``<folder>/<worker>.steps.tsv``.

A step line says when the step began (wall clock, seconds), how long ``engine.step()`` took, how long
the host spent between the previous step's end and this one's start (commands, worker hooks), and
what the step ran: rows, tokens, prefill tokens (rows of requests not yet sampling or with several
query tokens), and the queue lengths after scheduling. Lining these up with a client's inter-token
latencies tells engine stalls (long steps, long gaps) from delivery delays (neither).

Off by default; when off the engine pays one ``is None`` check per step.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from engine.scheduler import ScheduledBatch

ENV_VAR = "BATON_STEP_TRACE"
HEADER = "start_s\tstep_ms\tgap_ms\trows\ttokens\tprefill_tokens\trunning\twaiting\n"
FLUSH_EVERY_S = 1.0


def step_shape(batch: ScheduledBatch) -> tuple[int, int, int]:
    """Rows, tokens and prefill tokens of a batch, read before the step moves its requests on."""
    prefill = sum(s.num_new_tokens for s in batch.requests if s.num_new_tokens > 1 or not s.samples)
    return len(batch.requests), batch.num_tokens, prefill


class StepTrace:
    """Appends one line per step; flushes at most once a second (and on ``close``)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(path, "w", buffering=1 << 16)  # noqa: SIM115 - open for the host's lifetime
        self._file.write(HEADER)
        self._last_end: float | None = None
        self._last_flush = time.perf_counter()

    @classmethod
    def from_env(cls, worker_name: str) -> StepTrace | None:
        folder = os.environ.get(ENV_VAR, "")
        if not folder:
            return None
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", worker_name)
        return cls(Path(folder) / f"{safe_name}.steps.tsv")

    def record(
        self,
        rows: int,
        tokens: int,
        prefill_tokens: int,
        start: float,
        end: float,
        running: int,
        waiting: int,
    ) -> None:
        """``start``/``end``: ``time.perf_counter()`` around the step; the shape from ``step_shape``."""
        gap_ms = 0.0 if self._last_end is None else (start - self._last_end) * 1e3
        self._last_end = end
        wall_start = time.time() - (time.perf_counter() - start)
        self._file.write(
            f"{wall_start:.6f}\t{(end - start) * 1e3:.3f}\t{gap_ms:.3f}\t{rows}\t"
            f"{tokens}\t{prefill_tokens}\t{running}\t{waiting}\n"
        )
        if end - self._last_flush >= FLUSH_EVERY_S:
            self._file.flush()
            self._last_flush = end

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
