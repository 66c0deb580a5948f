"""The whole router stack in one process: openai client -> HTTP app -> ClusterBackend -> gRPC ->
fake prefill/decode worker services (the workers are fakes: this is a test of the router as their
caller; the system test with real workers lives with the launcher)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import openai
import pytest
import uvicorn

from router.app import create_app
from router.cluster_backend import ClusterBackend, ClusterConfig
from router.config import RouterConfig
from router.placement import EmbeddedPlacementStore, WorkerRecord, WorkerRole
from router.policy import CacheAwarePolicy
from tests.router.fake_workers import TOKEN_BASE, FakeDecode, FakePrefill, WorkerServer

pytestmark = pytest.mark.anyio


async def test_openai_client_through_the_cluster_backend(tokenizer) -> None:
    store = EmbeddedPlacementStore()
    decode, prefill = FakeDecode("d0"), FakePrefill("p0")
    async with AsyncExitStack() as stack:
        for servicer, role in ((decode, WorkerRole.DECODE), (prefill, WorkerRole.PREFILL)):
            server = await stack.enter_async_context(WorkerServer(servicer))
            record = WorkerRecord(servicer.worker_id, role, server.address, "fp", 16, 1000, 1000)
            await store.register(record, ttl_s=60)
        cluster = ClusterConfig(
            model_fingerprint="fp", block_size=16, max_model_len=512, vocab_size=tokenizer.vocab_size
        )
        backend = ClusterBackend(cluster, store, CacheAwarePolicy(local_prefill_threshold=32))
        app = create_app(RouterConfig("m"), backend, store, tokenizer)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not serving.done(), "uvicorn exited"
                await asyncio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
            long_prompt = "Hello from Baton! " * 10
            expected = tokenizer.decode([TOKEN_BASE + i for i in range(6)])
            r = await client.completions.create(model="m", prompt=long_prompt, max_tokens=6)
            assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
            assert r.usage.prompt_tokens_details.cached_tokens == 16  # reported by the prefill worker
            assert len(prefill.prefills) == 1  # split: long prompt
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == expected
            assert len(prefill.prefills) == 1 and decode.decodes[-1].local_prefill  # short: local on D
            assert (await client.models.list()).data[0].id == "m"
            await client.close()
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, timeout=10)
