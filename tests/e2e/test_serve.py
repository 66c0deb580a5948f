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


def test_openai_client_matches_engine(served):
    """Sync and async, streaming and not, chat and completions: greedy text equals the engine's."""
    client = OpenAI(base_url=served.url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    llm = LLM()
    greedy = SamplingParams(max_tokens=32, temperature=0.0)
    chat_ref = llm.chat(QUESTION, greedy)[0].text
    prompt = "The capital of France is"
    comp_ref = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0))[0].text
    assert "Paris" in chat_ref

    resp = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=32, temperature=0)
    assert resp.choices[0].message.content == chat_ref
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=32, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == chat_ref
    assert client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0).choices[0].text == comp_ref
    parts = [c.choices[0].text for c in client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == comp_ref

    async def run_async() -> tuple[str, str, str, str]:
        aclient = AsyncOpenAI(base_url=served.url + "/v1", api_key="none")
        chat = await aclient.chat.completions.create(model=model, messages=QUESTION, max_tokens=32, temperature=0)
        chat_stream = []
        async for chunk in await aclient.chat.completions.create(model=model, messages=QUESTION, max_tokens=32, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                chat_stream.append(chunk.choices[0].delta.content)
        comp = await aclient.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        comp_stream = []
        async for chunk in await aclient.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True):
            if chunk.choices:
                comp_stream.append(chunk.choices[0].text)
        return chat.choices[0].message.content, "".join(chat_stream), comp.choices[0].text, "".join(comp_stream)

    assert asyncio.run(run_async()) == (chat_ref, chat_ref, comp_ref, comp_ref)


def test_status_lists_the_workers(served):
    status = served.admin("/admin/status")
    assert status["counts"] == {"prefill": 1, "decode": 1}
    assert all(w["healthy"] for w in status["workers"])


def test_baton_bench_against_baton_serve(served, tmp_path):
    """A brief ``baton bench`` run (tiny load): its JSON carries vLLM bench's fields."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "baton", "bench", "--base-url", served.url, "--dataset", "random", "--num-prompts", "6",
         "--random-input-len", "32", "--random-output-len", "8", "--max-concurrency", "2", "--ignore-eos",
         "--result-dir", str(tmp_path), "--result-filename", "bench.json", "--disable-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    for field in ("completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                  "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "total_output_tokens"):
        assert field in result, field
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 6 * 8
    assert list(tmp_path.glob("*.png")), "plots were not written"


def test_ctrl_c_leaves_nothing_behind(served):
    assert served.interrupt() == 0
    deadline = time.time() + 30
    while ray_processes() and time.time() < deadline:
        time.sleep(1)
    assert not ray_processes(), ray_processes()
