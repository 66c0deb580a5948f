"""Arrival processes and the dispatcher."""

import asyncio
import math
import time

import numpy as np
import pytest

from baton.bench.arrivals import (
    SweepPoint,
    arrival_gaps,
    arrival_offsets,
    dispatch,
    parse_concurrencies,
    parse_rates,
    sweep_points,
)

DRAWS = 200_000


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_gaps_have_exponential_mean_and_variance(rate):
    gaps = arrival_gaps(DRAWS, rate, burstiness=1.0, seed=11)
    # Exponential(rate): mean 1/rate, variance 1/rate^2. With 2e5 draws the standard error of the
    # mean is 0.22% of it and of the variance about 0.5%, so 2% / 4% tolerances are > 8 sigma.
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=0.02)
    assert gaps.var() == pytest.approx(1.0 / rate**2, rel=0.04)
    # Memorylessness, checked through the tail: P(gap > 2/rate) = e^-2.
    assert np.mean(gaps > 2.0 / rate) == pytest.approx(math.exp(-2), rel=0.03)


def test_burstiness_changes_variance_not_mean():
    bursty = arrival_gaps(DRAWS, 2.0, burstiness=0.5, seed=3)
    regular = arrival_gaps(DRAWS, 2.0, burstiness=4.0, seed=3)
    assert bursty.mean() == pytest.approx(0.5, rel=0.02)
    assert regular.mean() == pytest.approx(0.5, rel=0.02)
    assert bursty.var() == pytest.approx(1.0 / (4.0 * 0.5), rel=0.05)
    assert regular.var() == pytest.approx(1.0 / (4.0 * 4.0), rel=0.05)


def test_gaps_are_seeded():
    assert np.array_equal(arrival_gaps(100, 3.0, 1.0, seed=5), arrival_gaps(100, 3.0, 1.0, seed=5))
    assert not np.array_equal(arrival_gaps(100, 3.0, 1.0, seed=5), arrival_gaps(100, 3.0, 1.0, seed=6))


def test_offsets():
    offsets = arrival_offsets(1000, 10.0, 1.0, seed=0)
    assert offsets[0] == 0.0 and len(offsets) == 1000
    assert np.all(np.diff(offsets) >= 0)
    assert offsets[-1] == pytest.approx(999 / 10.0, rel=0.1)
    assert np.array_equal(arrival_offsets(5, math.inf, 1.0, seed=0), np.zeros(5))
    assert len(arrival_offsets(1, 1.0, 1.0, seed=0)) == 1
    with pytest.raises(ValueError):
        arrival_gaps(3, 1.0, 0.0, seed=0)


def test_parsing_and_sweeps():
    assert parse_rates("1, 2,4") == (1.0, 2.0, 4.0)
    assert parse_rates("inf") == (math.inf,)
    for bad in ("0", "-1", "fast", ""):
        with pytest.raises(ValueError):
            parse_rates(bad)
    assert parse_concurrencies(None) == (None,)
    assert parse_concurrencies("1,8") == (1, 8)
    for bad in ("0", "x", "2.5"):
        with pytest.raises(ValueError):
            parse_concurrencies(bad)
    assert sweep_points((1.0, 2.0), (4,)) == [SweepPoint(1.0, 4), SweepPoint(2.0, 4)]
    assert sweep_points((math.inf,), (1, 2)) == [SweepPoint(math.inf, 1), SweepPoint(math.inf, 2)]
    with pytest.raises(ValueError, match="not both"):
        sweep_points((1.0, 2.0), (1, 2))


def test_dispatch_caps_in_flight_requests_and_keeps_order():
    in_flight = 0
    peak = 0

    async def send(i: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return i * 10

    results = asyncio.run(dispatch(list(range(20)), [0.0] * 20, 3, send))
    assert results == [i * 10 for i in range(20)]
    assert peak == 3
    peak = 0
    asyncio.run(dispatch(list(range(20)), [0.0] * 20, None, send))
    assert peak == 20  # no cap: an infinite rate really sends everything at once


def test_dispatch_sends_no_earlier_than_the_schedule():
    sent_at: list[float] = []

    async def send(i: int) -> None:
        sent_at.append(time.perf_counter())

    offsets = [0.0, 0.05, 0.1, 0.2]
    start = time.perf_counter()
    asyncio.run(dispatch(list(range(4)), offsets, None, send))
    for when, offset in zip(sent_at, offsets, strict=True):
        assert when - start >= offset - 0.002  # timers may fire a hair early, never a tick early
