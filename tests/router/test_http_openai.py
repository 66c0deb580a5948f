"""The official ``openai`` client (sync + async, streaming and not) against the real router app on
uvicorn, over a deterministic fake backend (this tests the router, the backend's caller)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.router.conftest import RunningRouter
from tests.router.router_testkit import REPLY

MODEL = "baton-test"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def client(router: RunningRouter) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def aclient(router: RunningRouter) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def chat_prompt_len(tokenizer) -> int:
    return len(tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False))


def test_chat_non_streaming(router: RunningRouter, tokenizer) -> None:
    r = client(router).chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    [choice] = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    n_reply = len(tokenizer.encode(REPLY, add_special_tokens=False))
    assert r.usage.completion_tokens == n_reply + 1  # + EOS
    assert r.usage.prompt_tokens == chat_prompt_len(tokenizer)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == (r.usage.prompt_tokens // 16) * 16
    [sent] = router.backend.requests
    assert list(sent.prompt_token_ids) == tokenizer.encode(
        tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False
    )
    assert sent.sampling.temperature == 0.0


def test_chat_streaming_with_usage(router: RunningRouter, tokenizer) -> None:
    chunks = list(
        client(router).chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == chat_prompt_len(tokenizer)
    assert usage_chunk.usage.completion_tokens == len(tokenizer.encode(REPLY, add_special_tokens=False)) + 1
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_streaming_without_usage_has_no_usage_chunk(router: RunningRouter) -> None:
    chunks = list(client(router).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert all(c.choices for c in chunks)


def test_completions_sync(router: RunningRouter, tokenizer) -> None:
    c = client(router)
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    reply_ids = tokenizer.encode(REPLY, add_special_tokens=False)
    assert r.choices[0].text == tokenizer.decode(reply_ids[:5])
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    streamed = list(c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_async_client_chat_and_completions(router: RunningRouter) -> None:
    async def main() -> None:
        c = aclient(router)
        r = await c.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert r.choices[0].message.content == REPLY
        stream = await c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
        assert text == REPLY
        r2 = await c.completions.create(model=MODEL, prompt="hi", max_tokens=200)
        assert r2.choices[0].text == REPLY
        stream2 = await c.completions.create(model=MODEL, prompt="hi", stream=True, max_tokens=200)
        assert "".join([ch.choices[0].text async for ch in stream2]) == REPLY
        # Concurrent requests do not mix their streams.
        results = await asyncio.gather(
            *(c.completions.create(model=MODEL, prompt="hi", max_tokens=k) for k in range(1, 9))
        )
        assert [r.usage.completion_tokens for r in results] == list(range(1, 9))
        await c.close()

    asyncio.run(main())


def test_n_choices_with_seed(router: RunningRouter, tokenizer) -> None:
    r = client(router).chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=5, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 3
    assert r.usage.completion_tokens == 12
    assert sorted(req.sampling.seed for req in router.backend.requests) == [5, 6, 7]
    chunks = list(
        client(router).chat.completions.create(model=MODEL, messages=MESSAGES, n=2, stream=True, max_tokens=4)
    )
    by_index: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] = by_index.get(c.index, "") + (c.delta.content or "")
    assert set(by_index) == {0, 1}


def test_batched_completion_prompts(router: RunningRouter) -> None:
    r = client(router).completions.create(model=MODEL, prompt=["a", "bb", "ccc"], n=2, max_tokens=3)
    assert [c.index for c in r.choices] == list(range(6))
    prompt_lens = sorted(len(req.prompt_token_ids) for req in router.backend.requests)
    assert len(prompt_lens) == 6
    assert r.usage.prompt_tokens == sum(prompt_lens) // 2  # each prompt counted once, not n times


def test_token_id_prompt(router: RunningRouter, tokenizer) -> None:
    ids = tokenizer.encode("hello there")
    client(router).completions.create(model=MODEL, prompt=ids, max_tokens=2)
    assert list(router.backend.requests[-1].prompt_token_ids) == ids


def test_chat_logprobs_shape(router: RunningRouter, tokenizer) -> None:
    r = client(router).chat.completions.create(
        model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2, max_tokens=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    reply_ids = tokenizer.encode(REPLY, add_special_tokens=False)
    for i, entry in enumerate(content):
        assert entry.token == tokenizer.decode([reply_ids[i]], skip_special_tokens=False)
        assert entry.logprob == -0.125 * (i % 4)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == entry.logprob
    no_lp = client(router).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert no_lp.choices[0].logprobs is None
    streamed = list(
        client(router).chat.completions.create(
            model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=1, max_tokens=3, stream=True
        )
    )
    tokens = [
        e.token
        for ch in streamed
        if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content
    ]
    assert tokens == [e.token for e in content]


def test_completion_logprobs_shape(router: RunningRouter) -> None:
    r = client(router).completions.create(model=MODEL, prompt="x", logprobs=2, max_tokens=4)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_stop_strings(router: RunningRouter) -> None:
    c = client(router)
    r = c.completions.create(model=MODEL, prompt="x", stop=["fox"], max_tokens=100)
    assert r.choices[0].text == REPLY[: REPLY.index("fox")]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == "fox"
    assert router.backend.aborted, "a sequence stopped by the router is aborted on the workers"
    inc = c.completions.create(
        model=MODEL, prompt="x", stop=["fox"], max_tokens=100, extra_body={"include_stop_str_in_output": True}
    )
    assert inc.choices[0].text == REPLY[: REPLY.index("fox") + 3]
    # A stop string spanning token boundaries, streamed: nothing past its start ever leaks.
    stop = "quick brown"
    chunks = list(
        c.completions.create(model=MODEL, prompt="x", stop=[stop, "zzz"], max_tokens=100, stream=True)
    )
    assert "".join(ch.choices[0].text for ch in chunks) == REPLY[: REPLY.index(stop)]
    chat = c.chat.completions.create(model=MODEL, messages=MESSAGES, stop="Baton")
    assert chat.choices[0].message.content == "Hello from "


def test_min_tokens_defers_stop_strings(router: RunningRouter, tokenizer) -> None:
    # "Hello" appears in the first token(s); with min_tokens the match there does not count.
    r = client(router).completions.create(
        model=MODEL, prompt="x", stop=["Hel"], max_tokens=8, extra_body={"min_tokens": 6}
    )
    reply_ids = tokenizer.encode(REPLY, add_special_tokens=False)
    assert r.choices[0].text == tokenizer.decode(reply_ids[:8])
    assert r.choices[0].finish_reason == "length"
    assert router.backend.requests[-1].sampling.min_tokens == 6


def test_stop_token_ids_and_extra_sampling_fields(router: RunningRouter, tokenizer) -> None:
    reply_ids = tokenizer.encode(REPLY, add_special_tokens=False)
    r = client(router).completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=50,
        extra_body={
            "stop_token_ids": [reply_ids[3]],
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "skip_special_tokens": True,
        },
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        top_p=0.9,
        logit_bias={str(reply_ids[0]): 5},
        user="someone",
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == reply_ids[3]
    s = router.backend.requests[-1].sampling
    assert (s.top_k, s.min_p, s.repetition_penalty, s.ignore_eos, s.top_p) == (
        5,
        pytest.approx(0.1),
        1.1,
        True,
        0.9,
    )
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias) == (0.5, -0.5, ((reply_ids[0], 5.0),))
    assert s.stop_token_ids == (reply_ids[3],)


def test_max_completion_tokens_and_default_budget(router: RunningRouter, tokenizer) -> None:
    c = client(router)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3, max_tokens=50)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    c.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert router.backend.requests[-1].sampling.max_tokens == 256 - chat_prompt_len(tokenizer)


def test_echo(router: RunningRouter) -> None:
    r = client(router).completions.create(model=MODEL, prompt="Echo me", echo=True, max_tokens=2)
    assert r.choices[0].text.startswith("Echo me")


def test_unknown_fields_are_accepted(router: RunningRouter) -> None:
    r = client(router).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"some_future_field": {"x": 1}, "tools": []}
    )
    assert r.choices[0].finish_reason == "length"


def test_backend_failure_before_first_token_is_a_status(router: RunningRouter) -> None:
    router.backend.fail_after = 0
    with pytest.raises(openai.APIStatusError) as err:
        client(router).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert err.value.status_code == 503
    body = err.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_error_after_streaming_started_is_an_error_chunk_then_done(router: RunningRouter) -> None:
    router.backend.fail_after = 3
    body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "stream": True}
    with router.http.stream("POST", router.url + "/v1/completions", json=body, timeout=20) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert "injected failure" in error["error"]["message"]
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
    assert len(texts) >= 1


def test_client_disconnect_aborts_streaming_request(router: RunningRouter) -> None:
    router.backend.token_delay_s = 0.05
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with router.http.stream("POST", router.url + "/v1/completions", json=body, timeout=20) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break  # got a chunk: now hang up
    wait_for(lambda: len(router.backend.aborted) == 1)
    [req] = router.backend.requests
    assert router.backend.aborted == [req.request_id]
    assert req.request_id not in router.backend.finished


def test_client_disconnect_aborts_non_streaming_request(router: RunningRouter) -> None:
    router.backend.token_delay_s = 0.05
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        router.http.post(router.url + "/v1/completions", json=body, timeout=0.5)
    wait_for(lambda: len(router.backend.aborted) == 1)
    assert router.backend.aborted == [router.backend.requests[0].request_id]


def wait_for(condition, timeout_s: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.02)
