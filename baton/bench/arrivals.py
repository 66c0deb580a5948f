"""When requests are sent: Poisson (or gamma-bursty) arrivals, a concurrency cap, sweeps.

The load is open-loop: request i is sent at its scheduled offset whether or not earlier ones have
finished (that is what "offered load at rate r" means). ``max_concurrency`` then bounds how many
are in flight; a request scheduled while the cap is reached waits for a free slot, as in vLLM's
``bench serve``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


def parse_rates(text: str) -> tuple[float, ...]:
    """``"1,2,4"`` -> (1.0, 2.0, 4.0); ``"inf"`` -> (inf,). Rates are requests per second, > 0."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            rate = float(part)
        except ValueError as exc:
            raise ValueError(f"request rate {part!r} is not a number or 'inf'") from exc
        if not rate > 0:
            raise ValueError(f"request rate must be > 0 (or inf), got {part!r}")
        rates.append(rate)
    if not rates:
        raise ValueError("no request rate given")
    return tuple(rates)


def parse_concurrencies(text: str | None) -> tuple[int | None, ...]:
    """``None`` -> (None,) meaning no cap; ``"1,4,16"`` -> (1, 4, 16)."""
    if text is None:
        return (None,)
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"max concurrency must be a positive integer, got {part!r}")
        values.append(int(part))
    if not values:
        raise ValueError("no max concurrency given")
    return tuple(values)


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: an offered rate and an optional in-flight cap."""

    request_rate: float
    max_concurrency: int | None


def sweep_points(rates: Sequence[float], concurrencies: Sequence[int | None]) -> list[SweepPoint]:
    """Sweeps vary one axis: several rates, or several concurrency caps, not both at once."""
    if len(rates) > 1 and len(concurrencies) > 1:
        raise ValueError("sweep either --request-rate or --max-concurrency, not both")
    return [SweepPoint(rate, conc) for rate in rates for conc in concurrencies]


def arrival_gaps(num: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """``num`` gaps in seconds between consecutive sends.

    Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate for every burstiness, variance
    1/(rate^2 * burstiness). Burstiness 1 is an exponential gap, i.e. a Poisson process; smaller
    is burstier, larger is more regular. An infinite rate gives zero gaps (everything at once).
    """
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(num)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)


def arrival_offsets(num: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send time of each request relative to the first, which goes at 0."""
    gaps = arrival_gaps(max(num - 1, 0), rate, burstiness, seed)
    return np.concatenate([[0.0], np.cumsum(gaps)])[:num]


async def dispatch(
    items: Sequence[T],
    offsets: Sequence[float],
    max_concurrency: int | None,
    send: Callable[[T], Awaitable[R]],
) -> list[R]:
    """Start ``send(item)`` at each offset (seconds after the call), at most ``max_concurrency`` at a
    time; results in item order. Offsets are absolute, so sleep jitter does not accumulate."""
    if len(items) != len(offsets):
        raise ValueError("one offset per item")
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(item: T) -> R:
        if slots is None:
            return await send(item)
        async with slots:
            return await send(item)

    start = loop.time()
    tasks: list[asyncio.Task[R]] = []
    try:
        for item, offset in zip(items, offsets, strict=True):
            delay = start + float(offset) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(item)))
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
