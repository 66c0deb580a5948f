"""/v1/models, /health, /version, /tokenize, /detokenize and /metrics on the running app."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.router.conftest import RunningRouter

MODEL = "baton-test"


def samples(router: RunningRouter) -> dict[tuple[str, tuple], float]:
    text = router.http.get(router.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


def test_models_version(router: RunningRouter) -> None:
    models = router.http.get(router.url + "/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert (card["id"], card["object"], card["max_model_len"]) == (MODEL, "model", 256)
    assert router.http.get(router.url + "/version").json() == {"version": "0.1.0"}


def test_health_is_honest(router: RunningRouter) -> None:
    assert router.http.get(router.url + "/health").status_code == 200
    router.backend.is_ready = False
    resp = router.http.get(router.url + "/health")
    assert resp.status_code == 503 and resp.json()["status"] == "unavailable"


def test_tokenize_detokenize_roundtrip(router: RunningRouter, tokenizer) -> None:
    r = router.http.post(router.url + "/tokenize", json={"model": MODEL, "prompt": "Hello from Baton"}).json()
    assert r["tokens"] == tokenizer.encode("Hello from Baton") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    back = router.http.post(router.url + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back == {"prompt": "Hello from Baton"}
    chat = router.http.post(
        router.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}
    ).json()
    expected = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False
    )
    assert chat["tokens"] == expected


def test_metrics_count_requests_tokens_and_routing(router: RunningRouter, tokenizer) -> None:
    before = samples(router)
    body = {"model": MODEL, "prompt": "x" * 40, "max_tokens": 4}  # >= 32 prompt tokens: the fake splits
    assert router.http.post(router.url + "/v1/completions", json=body).status_code == 200
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True}
    assert router.http.post(router.url + "/v1/completions", json=body).status_code == 200
    after = samples(router)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    prompt_tokens = len(tokenizer.encode("x" * 40)) + len(tokenizer.encode("x"))
    assert delta("baton:request_success_total", finished_reason="length") == 2
    assert delta("baton:prompt_tokens_total") == prompt_tokens
    assert delta("baton:generation_tokens_total") == 7
    assert delta("baton:routing_decisions_total", decision="split") == 1
    assert delta("baton:routing_decisions_total", decision="local") == 1
    assert delta("baton:time_to_first_token_seconds_count") == 2
    assert delta("baton:e2e_request_latency_seconds_count") == 2
    assert delta("baton:inter_token_latency_seconds_count") == 5  # (4 - 1) + (3 - 1)
    assert after[("baton:num_requests_running", ())] == 0
    assert after[("baton:num_requests_waiting", ())] == 0


def test_failed_requests_are_counted_and_gauges_return_to_zero(router: RunningRouter) -> None:
    before = samples(router)
    router.backend.fail_after = 0
    assert (
        router.http.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code
        == 503
    )
    after = samples(router)
    key = ("baton:request_failure_total", (("code", "unavailable"),))
    assert after[key] - before.get(key, 0.0) == 1
    assert after[("baton:num_requests_waiting", ())] == 0
