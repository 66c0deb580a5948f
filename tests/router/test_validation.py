"""Every row of the validation table: status, ``param`` and OpenAI's error shape, before any work."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.router.conftest import RunningRouter

MODEL = "baton-test"
MSGS = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
BIG = 10**6  # beyond the test tokenizer's vocabulary (400)


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": MSGS, **kw}


def comp(**kw) -> dict:
    return {"model": MODEL, "prompt": "hi", **kw}


ROWS = [
    # (id, path, body, status, param)
    ("temperature-negative", CHAT, chat(temperature=-0.1), 400, "temperature"),
    ("temperature-inf", CHAT, chat(temperature=float("inf")), 400, "temperature"),
    ("temperature-nan", COMP, comp(temperature=float("nan")), 400, "temperature"),
    ("temperature-type", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("top_p-zero", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_p-above-one", COMP, comp(top_p=1.01), 400, "top_p"),
    ("top_k-below-minus-one", CHAT, chat(top_k=-2), 400, "top_k"),
    ("min_p-negative", CHAT, chat(min_p=-0.01), 400, "min_p"),
    ("min_p-above-one", COMP, comp(min_p=1.5), 400, "min_p"),
    ("presence_penalty", CHAT, chat(presence_penalty=2.5), 400, "presence_penalty"),
    ("frequency_penalty", COMP, comp(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("repetition_penalty", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("n-zero", CHAT, chat(n=0), 400, "n"),
    ("n-over-limit", CHAT, chat(n=17), 400, "n"),
    ("n-times-prompts-over-limit", COMP, comp(prompt=["a", "b", "c"], n=6), 400, "n"),
    ("seed-overflow", CHAT, chat(seed=2**64), 400, "seed"),
    ("logit_bias-out-of-vocab", CHAT, chat(logit_bias={str(BIG): 1}), 400, "logit_bias"),
    ("logit_bias-negative-id", COMP, comp(logit_bias={"-1": 1}), 400, "logit_bias"),
    ("logit_bias-not-an-id", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit_bias-value", CHAT, chat(logit_bias={"5": 101}), 400, "logit_bias"),
    ("stop_token_ids-out-of-vocab", CHAT, chat(stop_token_ids=[BIG]), 400, "stop_token_ids"),
    ("stop-too-many", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("stop-empty-string", COMP, comp(stop=[""]), 400, "stop"),
    ("max_tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_completion_tokens-zero", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("min_tokens-negative", CHAT, chat(min_tokens=-1), 400, "min_tokens"),
    ("min_tokens-over-max_tokens", COMP, comp(min_tokens=10, max_tokens=5), 400, "min_tokens"),
    ("top_logprobs-over-limit", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("completion-logprobs-over-limit", COMP, comp(logprobs=21), 400, "logprobs"),
    ("messages-empty", CHAT, chat(messages=[]), 400, "messages"),
    ("messages-missing", CHAT, {"model": MODEL}, 400, "messages"),
    ("messages-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    (
        "messages-image-part",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content",
    ),
    ("messages-not-a-list", CHAT, chat(messages="hi"), 400, "messages"),
    ("response_format", CHAT, chat(response_format={"type": "json_object"}), 400, "response_format"),
    ("prompt-empty", COMP, comp(prompt=""), 400, "prompt"),
    ("prompt-empty-list", COMP, comp(prompt=[]), 400, "prompt"),
    ("prompt-token-out-of-vocab", COMP, comp(prompt=[1, BIG]), 400, "prompt"),
    ("prompt-missing", COMP, {"model": MODEL}, 400, "prompt"),
    ("suffix", COMP, comp(suffix="x"), 400, "suffix"),
    ("best_of", COMP, comp(best_of=3), 400, "best_of"),
    ("echo-with-logprobs", COMP, comp(echo=True, logprobs=1), 400, "echo"),
    (
        "context-prompt-too-long-chat",
        CHAT,
        chat(messages=[{"role": "user", "content": "7 " * 300}]),
        400,
        "input_tokens",
    ),
    ("context-prompt-too-long-ids", COMP, comp(prompt=[5] * 256), 400, "input_tokens"),
    ("context-prompt-plus-max_tokens", COMP, comp(prompt=[5] * 200, max_tokens=57), 400, "max_tokens"),
    (
        "context-prompt-plus-max_completion_tokens",
        CHAT,
        chat(messages=[{"role": "user", "content": "7 " * 100}], max_completion_tokens=250),
        400,
        "max_completion_tokens",
    ),
    ("unknown-model-chat", CHAT, chat(model="gpt-4"), 404, "model"),
    ("unknown-model-completions", COMP, comp(model="gpt-4"), 404, "model"),
]


def assert_error_shape(resp: httpx.Response, status: int, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    return err


@pytest.mark.parametrize(("path", "body", "status", "param"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_validation_row(router: RunningRouter, path: str, body: dict, status: int, param: str) -> None:
    resp = router.http.post(
        router.url + path, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    err = assert_error_shape(resp, status, param)
    if status == 404:
        assert err["code"] == "model_not_found"
    if (
        param == "input_tokens"
        or param in ("max_tokens", "max_completion_tokens")
        and "context" in err["message"]
    ):
        assert err["code"] == "context_length_exceeded"
    assert router.backend.requests == [], "validation must reject before any work"


@pytest.mark.parametrize("path", [CHAT, COMP])
@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b"[" * 5000 + b"]" * 5000],
    ids=["broken", "empty", "array", "string", "not-utf8", "deeply-nested"],
)
def test_malformed_json_is_400(router: RunningRouter, path: str, raw: bytes) -> None:
    resp = router.http.post(router.url + path, content=raw, headers={"content-type": "application/json"})
    err = assert_error_shape(resp, 400, None)
    assert err["code"] == "invalid_json"


@pytest.mark.parametrize("path", [CHAT, COMP])
def test_body_over_limit_by_content_length_is_413(router: RunningRouter, path: str) -> None:
    body = json.dumps(chat(messages=[{"role": "user", "content": "x" * 70_000}])).encode()
    resp = router.http.post(router.url + path, content=body, headers={"content-type": "application/json"})
    err = assert_error_shape(resp, 413, None)
    assert err["code"] == "request_too_large"


def test_body_over_limit_without_content_length_is_413(router: RunningRouter) -> None:
    def chunks():  # chunked transfer encoding: no Content-Length, counted as it arrives
        yield b'{"model": "baton-test", "prompt": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}'

    resp = router.http.post(router.url + COMP, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers
    assert_error_shape(resp, 413, None)


def test_unknown_route_and_method_use_the_error_shape(router: RunningRouter) -> None:
    resp = router.http.get(router.url + "/v1/nothing")
    assert resp.status_code == 404 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    resp = router.http.get(router.url + CHAT)
    assert resp.status_code == 405 and "error" in resp.json()


def test_tokenize_and_detokenize_validation(router: RunningRouter) -> None:
    assert_error_shape(router.http.post(router.url + "/tokenize", json={"model": MODEL}), 400, "prompt")
    assert_error_shape(
        router.http.post(router.url + "/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model"
    )
    assert_error_shape(router.http.post(router.url + "/detokenize", json={"tokens": [BIG]}), 400, "tokens")
    assert_error_shape(router.http.post(router.url + "/detokenize", json={"tokens": "abc"}), 400, "tokens")
