"""Metric definitions checked against values computed by hand."""

import time

import pytest

from baton.bench.client import RequestResult
from baton.bench.metrics import (
    compute_metrics,
    parse_goodput,
    parse_metric_percentiles,
    parse_percentile_metrics,
    percentile_key,
    tpot_seconds,
)


def ok(prompt_len, output_len, ttft, e2el, itl, kind="default"):
    return RequestResult(True, prompt_len, output_len, ttft, tuple(itl), e2el, send_time=10.0, kind=kind)


def failed(prompt_len, error):
    return RequestResult(False, prompt_len, 0, None, (), None, send_time=10.5, error=error)


# A: 5 tokens, TTFT 100 ms, e2e 500 ms -> TPOT (500-100)/4 = 100 ms, four 100 ms gaps.
# B: 1 token, TTFT 200 ms, e2e 200 ms -> no TPOT. C: failed.
A = ok(10, 5, 0.1, 0.5, [0.1, 0.1, 0.1, 0.1])
B = ok(20, 1, 0.2, 0.2, [])
C = failed(30, "HTTP 500: boom")


def test_tpot_definition():
    assert tpot_seconds(A) == pytest.approx(0.1)
    assert tpot_seconds(ok(1, 3, 0.2, 1.0, [0.3, 0.5])) == pytest.approx((1.0 - 0.2) / 2)
    assert tpot_seconds(B) is None  # one output token: undefined
    assert tpot_seconds(C) is None


def test_summary_matches_hand_computation():
    m = compute_metrics([A, B, C], duration_s=2.0, percentiles=(50.0, 99.0))
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_input_tokens"] == 30  # failed requests' prompts are not counted
    assert m["total_output_tokens"] == 6
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(18.0)
    # TTFT samples 100, 200 ms: population std 50; p99 by linear interpolation 100 + 0.99*100.
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["median_ttft_ms"] == pytest.approx(150.0)
    assert m["std_ttft_ms"] == pytest.approx(50.0)
    assert m["p99_ttft_ms"] == pytest.approx(199.0)
    assert m["p50_ttft_ms"] == pytest.approx(150.0)
    # TPOT only from A.
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["std_tpot_ms"] == pytest.approx(0.0)
    # ITL: four gaps of 100 ms.
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    assert m["p99_itl_ms"] == pytest.approx(100.0)
    # E2E 500 and 200 ms.
    assert m["mean_e2el_ms"] == pytest.approx(350.0)
    assert m["p99_e2el_ms"] == pytest.approx(200.0 + 0.99 * 300.0)
    assert m["request_goodput"] is None


def test_percentiles_linear_interpolation():
    # 1..100 ms: p90 sits at index 0.9*99 = 89.1 -> 90 + 0.1 * (91 - 90) = 90.1
    results = [ok(1, 2, (i + 1) / 1000.0, 1.0, [0.5]) for i in range(100)]
    m = compute_metrics(results, 1.0, percentile_metrics=("ttft",), percentiles=(90.0, 99.9))
    assert m["p90_ttft_ms"] == pytest.approx(90.1)
    assert m["p99.9_ttft_ms"] == pytest.approx(99.901)  # index 98.901 -> 99 + 0.901 * (100 - 99)
    assert m["median_ttft_ms"] == pytest.approx(50.5)
    assert "p90_tpot_ms" not in m  # percentiles only for the selected metrics...
    assert "mean_tpot_ms" in m  # ...while mean/median/std are always there


def test_goodput_counts_requests_meeting_every_slo():
    assert compute_metrics([A, B, C], 2.0, goodput_slos={"ttft": 150})["request_goodput"] == pytest.approx(
        0.5
    )
    # A's TPOT is 100 ms > 50; B has one token, so no TPOT, and passes.
    assert compute_metrics([A, B, C], 2.0, goodput_slos={"tpot": 50})["request_goodput"] == pytest.approx(0.5)
    both = compute_metrics([A, B, C], 2.0, goodput_slos={"ttft": 1000, "tpot": 100})
    assert both["request_goodput"] == pytest.approx(1.0)  # limits are inclusive
    none = compute_metrics([A, B, C], 2.0, goodput_slos={"ttft": 150, "e2el": 400})
    assert none["request_goodput"] == pytest.approx(0.0)  # A too slow end to end, B too slow to start


def test_raw_arrays_keep_request_order_and_failures():
    m = compute_metrics([A, B, C], 2.0)
    assert m["ttfts"] == [0.1, 0.2, None]
    assert m["output_lens"] == [5, 1, 0]
    assert m["input_lens"] == [10, 20, 30]
    assert m["itls"] == [[0.1, 0.1, 0.1, 0.1], [], []]
    assert m["errors"] == ["", "", "HTTP 500: boom"]
    assert m["send_times"] == [0.0, 0.0, 0.5]
    # The wall clock of the first send (perf_counter 10.0), to line runs up with server traces.
    assert m["start_time_unix"] == pytest.approx(time.time() - time.perf_counter() + 10.0, abs=1.0)


def test_by_kind_splits_latencies_per_request_kind():
    short_a = ok(10, 3, 0.1, 0.3, [0.1, 0.1], kind="short")
    short_b = ok(10, 3, 0.3, 0.5, [0.1, 0.1], kind="short")
    long_a = ok(900, 3, 2.0, 2.4, [0.2, 0.2], kind="long")
    long_failed = RequestResult(False, 900, 0, None, (), None, send_time=10.0, error="x", kind="long")
    m = compute_metrics([short_a, long_a, short_b, long_failed], 3.0, percentiles=(99.0,))
    assert set(m["by_kind"]) == {"short", "long"}
    short, long = m["by_kind"]["short"], m["by_kind"]["long"]
    assert (short["completed"], short["failed"], long["completed"], long["failed"]) == (2, 0, 1, 1)
    assert short["mean_ttft_ms"] == pytest.approx(200.0) and long["mean_ttft_ms"] == pytest.approx(2000.0)
    assert short["p99_itl_ms"] == pytest.approx(100.0) and long["p99_itl_ms"] == pytest.approx(200.0)
    assert m["mean_ttft_ms"] == pytest.approx(800.0)  # the overall numbers still pool every kind
    assert "by_kind" not in compute_metrics([A, B], 1.0)  # one kind: nothing to split


def test_all_failed_reports_nulls_not_zeros():
    m = compute_metrics([C, C], 1.0)
    assert m["completed"] == 0 and m["failed"] == 2
    assert m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None
    assert m["output_throughput"] == 0.0


def test_parsers():
    assert parse_goodput(["ttft:2000", "tpot:50"]) == {"ttft": 2000.0, "tpot": 50.0}
    assert parse_metric_percentiles("50, 90,99.9") == (50.0, 90.0, 99.9)
    assert parse_percentile_metrics("ttft,itl") == ("ttft", "itl")
    assert percentile_key(99.0) == "p99" and percentile_key(99.9) == "p99.9"
    for bad in (["ttft"], ["itl:5"], ["ttft:abc"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    with pytest.raises(ValueError):
        parse_metric_percentiles("0")
    with pytest.raises(ValueError):
        parse_metric_percentiles("101")
    with pytest.raises(ValueError):
        parse_percentile_metrics("ttft,latency")
    with pytest.raises(ValueError):
        compute_metrics([A], 0.0)
