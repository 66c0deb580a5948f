"""Per-piece timing lines for diagnosing KV transfers: ``BATON_KV_TRACE=1`` prints one line per
piece on each side (to stderr, which Ray forwards to the driver), with where its time went.

Off by default; when off a call costs one attribute lookup.
"""

from __future__ import annotations

import os
import sys
import time

ENABLED = os.environ.get("BATON_KV_TRACE", "") not in ("", "0")


def trace(side: str, event: str, **fields_ms: float | int | str) -> None:
    if not ENABLED:
        return
    parts = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields_ms.items())
    print(f"kv-trace {time.time():.3f} {side} {event} {parts}", file=sys.stderr, flush=True)
