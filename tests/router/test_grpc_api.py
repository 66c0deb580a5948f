"""The public gRPC API: a client generated from router.proto streams generations; standard health
reflects worker registration; reflection lists the service."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.cluster_backend import ClusterBackend, ClusterConfig
from router.config import RouterConfig
from router.grpc_server import SERVICE_NAME, create_grpc_server
from router.metrics import RouterMetrics
from router.placement import EmbeddedPlacementStore, WorkerRecord, WorkerRole
from router.policy import CacheAwarePolicy
from tests.router.router_testkit import REPLY, FakeBackend

pytestmark = pytest.mark.anyio
CONFIG = RouterConfig("baton-test", request_timeout_s=20)


class Api:
    def __init__(self, backend, tokenizer) -> None:
        self.backend = backend
        self.server = create_grpc_server(
            CONFIG, backend, tokenizer, RouterMetrics(CONFIG.served_model_name), 0.05
        )

    async def __aenter__(self) -> Api:
        port = await self.server.start("127.0.0.1:0")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(0)


@pytest.fixture
async def api(tokenizer):
    async with Api(FakeBackend(tokenizer), tokenizer) as a:
        yield a


async def generate(api: Api, **kw) -> list[router_pb2.GenerateResponse]:
    return [r async for r in api.stub.Generate(router_pb2.GenerateRequest(**kw), timeout=10)]


async def test_generate_text_streams_chunks_then_complete(api: Api, tokenizer) -> None:
    responses = await generate(
        api, request_id="abc", text="Hello", sampling=common_pb2.SamplingParams(temperature=0)
    )
    assert {r.request_id for r in responses} == {"abc"}
    chunks = [r.chunk for r in responses if r.WhichOneof("response") == "chunk"]
    assert "".join(c.text for c in chunks) == REPLY
    [complete] = [r.complete for r in responses if r.WhichOneof("response") == "complete"]
    assert responses[-1].WhichOneof("response") == "complete"
    assert complete.finish_reason == common_pb2.FINISH_REASON_STOP
    assert complete.stop_token_id == tokenizer.eos_token_ids[0]
    assert complete.num_prompt_tokens == len(tokenizer.encode("Hello"))
    assert complete.num_completion_tokens == sum(len(c.token_ids) for c in chunks)
    assert api.backend.requests[0].sampling.temperature == 0


async def test_generate_token_ids_chat_n_stop_and_logprobs(api: Api, tokenizer) -> None:
    ids = tokenizer.encode("some prompt")
    responses = await generate(
        api,
        token_ids=router_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(n=2, seed=1, max_tokens=40, top_logprobs=2, logprobs=True),
        stop=["fox"],
    )
    assert list(api.backend.requests[0].prompt_token_ids) == ids
    completes = {r.complete.index: r.complete for r in responses if r.WhichOneof("response") == "complete"}
    assert set(completes) == {0, 1}
    chunks = [r.chunk for r in responses if r.WhichOneof("response") == "chunk"]
    assert all(len(c.logprobs) == len(c.token_ids) == len(c.top_logprobs) for c in chunks)
    assert all(len(t.entries) == 2 for c in chunks for t in c.top_logprobs)
    stopped = [c for c in completes.values() if c.stop_string == "fox"]
    assert stopped and all(c.finish_reason == common_pb2.FINISH_REASON_STOP for c in stopped)
    chat = router_pb2.ChatInput(messages=[router_pb2.ChatMessage(role="user", content="hi")])
    responses = await generate(api, chat=chat, sampling=common_pb2.SamplingParams(max_tokens=3))
    expected = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False
    )
    assert list(api.backend.requests[-1].prompt_token_ids) == expected
    assert responses[-1].complete.finish_reason == common_pb2.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("kw", "code", "needle"),
    [
        (
            dict(text="x", sampling=common_pb2.SamplingParams(temperature=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            dict(text="x", sampling=common_pb2.SamplingParams(top_p=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        (
            dict(text="x", sampling=common_pb2.SamplingParams(top_logprobs=99)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_logprobs",
        ),
        (dict(text="x", model="other"), grpc.StatusCode.NOT_FOUND, "model"),
        (dict(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (dict(token_ids=router_pb2.TokenIds(ids=[10**6])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
        (
            dict(token_ids=router_pb2.TokenIds(ids=[5] * 300)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input_tokens",
        ),
        (dict(chat=router_pb2.ChatInput()), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    ],
)
async def test_generate_rejects_bad_requests_with_status(api: Api, kw, code, needle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(api, **kw)
    assert err.value.code() == code
    assert needle in err.value.details()
    assert api.backend.requests == []


async def test_failure_after_first_chunk_is_an_error_message(api: Api) -> None:
    api.backend.fail_after = 2
    responses = await generate(api, text="x", sampling=common_pb2.SamplingParams(max_tokens=20))
    assert responses[0].WhichOneof("response") == "chunk"
    assert responses[-1].WhichOneof("response") == "error"
    assert responses[-1].error.code == common_pb2.ERROR_CODE_UNAVAILABLE
    assert "injected failure" in responses[-1].error.message


async def test_failure_before_first_chunk_is_a_status(api: Api) -> None:
    api.backend.fail_after = 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(api, text="x")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_cancel_aborts(api: Api) -> None:
    api.backend.token_delay_s = 0.05
    call = api.stub.Generate(
        router_pb2.GenerateRequest(
            text="x", sampling=common_pb2.SamplingParams(ignore_eos=True, max_tokens=200)
        )
    )
    await call.read()
    call.cancel()
    for _ in range(100):
        if api.backend.aborted:
            break
        await asyncio.sleep(0.02)
    assert api.backend.aborted == [api.backend.requests[0].request_id]


async def test_tokenize_and_list_models(api: Api, tokenizer) -> None:
    r = await api.stub.Tokenize(router_pb2.TokenizeRequest(text="Hello there"))
    assert list(r.token_ids) == tokenizer.encode("Hello there") and r.count == len(r.token_ids)
    assert r.max_model_len == 256
    models = await api.stub.ListModels(router_pb2.ListModelsRequest())
    assert [m.id for m in models.models] == ["baton-test"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.stub.Tokenize(router_pb2.TokenizeRequest(text="x", model="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_not_serving_until_a_worker_registers(tokenizer) -> None:
    store = EmbeddedPlacementStore()
    config = ClusterConfig(model_fingerprint="fp", block_size=4, max_model_len=256, refresh_interval_s=0.05)
    backend = ClusterBackend(config, store, CacheAwarePolicy())
    await backend.start()
    try:
        async with Api(backend, tokenizer) as api:
            health = health_pb2_grpc.HealthStub(api.channel)
            for service in ("", SERVICE_NAME):
                r = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await store.register(
                WorkerRecord("d0", WorkerRole.DECODE, "127.0.0.1:9", "fp", 4, 10, 10), ttl_s=60
            )
            status = None
            for _ in range(100):
                status = (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.02)
            assert status == health_pb2.HealthCheckResponse.SERVING
            await store.deregister("d0")
            for _ in range(100):
                status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.02)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await backend.close()


async def test_health_check_answers_from_the_backend_at_the_moment_asked(tokenizer) -> None:
    """No poll in between (its period is an hour here): Check and HTTP /health never disagree."""
    backend = FakeBackend(tokenizer, is_ready=False)
    server = create_grpc_server(CONFIG, backend, tokenizer, RouterMetrics(CONFIG.served_model_name), 3600)
    port = await server.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            backend.is_ready = True
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
            backend.is_ready = False
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(0)


async def test_reflection_lists_the_service(api: Api) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
    [resp] = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    assert resp.file_descriptor_response.file_descriptor_proto  # the client can build stubs from it
