"""The README's main command, end to end: Ray + 1 prefill + 1 decode + router with the real default
model; the official ``openai`` client gets a sensible (and engine-identical) answer; Ctrl-C leaves no
Ray process behind."""

from __future__ import annotations

import asyncio
import time

import pytest
from openai import AsyncOpenAI, OpenAI

from engine.llm import LLM
from engine.sampling.params import SamplingParams
from tests.e2e.serving import Served, ray_processes

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served():
    assert not ray_processes(), f"Ray already running here: {ray_processes()}"
    s = Served()
    yield s
    s.kill_all()


def test_chat_answers_and_matches_engine(served):
    client = OpenAI(base_url=served.url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    resp = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=32, temperature=0)
    text = resp.choices[0].message.content
    assert "Paris" in text
    reference = LLM().chat(QUESTION, SamplingParams(max_tokens=32, temperature=0.0))[0].text
    assert text == reference

    # Streaming, async, and completions too.
    async def stream() -> str:
        aclient = AsyncOpenAI(base_url=served.url + "/v1", api_key="none")
        parts = []
        async for chunk in await aclient.chat.completions.create(model=model, messages=QUESTION, max_tokens=32, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    assert asyncio.run(stream()) == reference
    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in comp.choices[0].text


def test_status_lists_the_workers(served):
    status = served.admin("/admin/status")
    assert status["counts"] == {"prefill": 1, "decode": 1}
    assert all(w["healthy"] for w in status["workers"])


def test_ctrl_c_leaves_nothing_behind(served):
    assert served.interrupt() == 0
    deadline = time.time() + 30
    while ray_processes() and time.time() < deadline:
        time.sleep(1)
    assert not ray_processes(), ray_processes()
