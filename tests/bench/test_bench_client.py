"""The streaming client against a real SSE server on loopback with known timing.

Latency bounds: the server cannot send a token before its schedule, so measured values have a hard
lower bound (minus timer slack); upper bounds are generous because the test machine is shared.
"""

import asyncio
import statistics

import httpx
import pytest
from conftest import MODEL, Behaviour

from baton.bench.client import (
    EndpointConfig,
    OpenAIStreamClient,
    RequestResult,
    error_message,
    fetch_model_id,
    measure_tokens_per_word,
    normalize_base_url,
)
from baton.bench.datasets import BenchRequest, Message
from baton.bench.metrics import compute_metrics

SLACK_S = 0.003  # asyncio timers may fire up to a few ms early


def request(text: str = "hello there friend", output_len: int = 10, kind: str = "default") -> BenchRequest:
    return BenchRequest(
        (Message("user", text),), prompt_len=len(text.split()), output_len=output_len, kind=kind
    )


def send_all(base_url: str, requests: list[BenchRequest], **config) -> list[RequestResult]:
    async def go() -> list[RequestResult]:
        async with httpx.AsyncClient(trust_env=False) as http:
            client = OpenAIStreamClient(EndpointConfig(base_url=base_url, model=MODEL, **config), http)
            return [await client.send(r) for r in requests]  # one at a time: no queueing in the timings

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_ttft_and_itl_match_server_timing(sse_server, endpoint):
    behaviour = Behaviour(ttft_s=0.08, itl_s=0.02)
    with sse_server(behaviour) as srv:
        results = send_all(srv.base_url, [request(output_len=10) for _ in range(5)], endpoint=endpoint)
    assert all(r.success for r in results), [r.error for r in results]
    for r in results:
        assert r.output_len == 10
        assert len(r.itl) == 9
        assert r.ttft >= behaviour.ttft_s - SLACK_S  # the role-only chat chunk does not count as a token
        assert r.e2el >= behaviour.ttft_s + 9 * behaviour.itl_s - SLACK_S
        assert r.prompt_len == round(3 * 1.5)  # from the server's usage, not the estimate
    assert statistics.median(r.ttft for r in results) == pytest.approx(behaviour.ttft_s, abs=0.04)
    all_gaps = [gap for r in results for gap in r.itl]
    assert statistics.median(all_gaps) == pytest.approx(behaviour.itl_s, abs=0.008)
    assert statistics.mean(all_gaps) == pytest.approx(behaviour.itl_s, abs=0.008)
    metrics = compute_metrics(results, duration_s=sum(r.e2el for r in results))
    # TPOT = (e2e - ttft) / 9 and the server spaces the 9 later tokens itl_s apart.
    assert metrics["mean_tpot_ms"] == pytest.approx(behaviour.itl_s * 1000, abs=8)
    assert srv.payloads[0]["stream_options"] == {"include_usage": True}
    assert srv.payloads[0]["max_tokens"] == 10
    assert "ignore_eos" not in srv.payloads[0]


def test_connections_are_reused_between_requests(sse_server):
    # Each new connection would put a TCP connect into the next request's TTFT.
    with sse_server(Behaviour(ttft_s=0.005, itl_s=0.002)) as srv:
        results = send_all(srv.base_url, [request(output_len=5) for _ in range(6)])
    assert all(r.success for r in results)
    assert len(srv.client_ports) == 6 and len(set(srv.client_ports)) == 1


def test_output_tokens_come_from_usage_not_chunk_count(sse_server):
    with sse_server(Behaviour(ttft_s=0.01, itl_s=0.01, tokens_per_chunk=3)) as srv:
        (with_usage,) = send_all(srv.base_url, [request(output_len=10)])
    assert with_usage.output_len == 10 and len(with_usage.itl) == 3  # 4 chunks of 3+3+3+1 tokens
    with sse_server(Behaviour(ttft_s=0.01, itl_s=0.01, tokens_per_chunk=3, report_usage=False)) as srv:
        (without_usage,) = send_all(srv.base_url, [request(output_len=10)])
    assert without_usage.success and without_usage.output_len == 4  # falls back to text chunks
    assert without_usage.prompt_len == 3  # falls back to the dataset's estimate


def test_ignore_eos_is_sent_and_gives_exact_lengths(sse_server):
    with sse_server(Behaviour(ttft_s=0.01, itl_s=0.005, eos_after=4)) as srv:
        (natural,) = send_all(srv.base_url, [request(output_len=12)])
        (forced,) = send_all(srv.base_url, [request(output_len=12)], ignore_eos=True)
    assert natural.output_len == 4
    assert forced.output_len == 12
    assert srv.payloads[1]["ignore_eos"] is True


def test_failures_are_recorded_with_their_cause(sse_server):
    requests = [
        request("fine prompt", kind="ok"),
        request("please FAILME now"),
        request("please BREAKME now"),
        request("please HANGME now"),
        request("fine again"),
    ]
    with sse_server(Behaviour(ttft_s=0.01, itl_s=0.005)) as srv:
        results = send_all(srv.base_url, requests, timeout_s=1.0)
        (wrong_model,) = asyncio.run(_send_with_model(srv.base_url, "other-model"))
    ok, http_500, broken, hung, ok_again = results
    assert ok.success and ok_again.success and ok.kind == "ok"
    assert not http_500.success and http_500.error == "HTTP 500: injected failure"
    assert not broken.success and broken.error == "stream error: worker lost"
    assert not hung.success and hung.error == "timeout after 1s"
    assert not wrong_model.success and "HTTP 404" in wrong_model.error and "other-model" in wrong_model.error
    for failed in (http_500, broken, hung):
        assert failed.ttft is None and failed.output_len == 0
    metrics = compute_metrics(results, duration_s=2.0)
    assert metrics["completed"] == 2 and metrics["failed"] == 3
    assert metrics["errors"][1:4] == [http_500.error, broken.error, hung.error]


async def _send_with_model(base_url: str, model: str) -> list[RequestResult]:
    async with httpx.AsyncClient(trust_env=False) as http:
        client = OpenAIStreamClient(EndpointConfig(base_url=base_url, model=model), http)
        return [await client.send(request())]


def test_connection_refused_is_a_failure_not_a_crash():
    (result,) = send_all("http://127.0.0.1:9", [request()], timeout_s=2.0)
    assert not result.success and "ConnectError" in result.error


def test_model_discovery_and_tokenize_calibration(sse_server):
    async def go(base_url: str) -> tuple[str, float | None]:
        async with httpx.AsyncClient(trust_env=False) as http:
            model = await fetch_model_id(http, base_url, None)
            return model, await measure_tokens_per_word(http, base_url, model, None, "one two three four")

    with sse_server(Behaviour(tokenize_tokens_per_word=1.5)) as srv:
        assert asyncio.run(go(srv.base_url)) == (MODEL, 1.5)
    with sse_server(Behaviour(tokenize_tokens_per_word=None)) as srv:
        assert asyncio.run(go(srv.base_url)) == (MODEL, None)


def test_helpers():
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000"
    assert normalize_base_url("https://h") == "https://h"
    with pytest.raises(ValueError):
        normalize_base_url("h:8000")
    assert error_message(400, b'{"error": {"message": "too long"}}') == "HTTP 400: too long"
    assert error_message(422, b'{"detail": "bad field"}') == "HTTP 422: bad field"
    assert error_message(502, b"<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"
    with pytest.raises(ValueError):
        EndpointConfig(base_url="http://h", model="m", endpoint="embeddings")
