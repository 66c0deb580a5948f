"""ClusterBackend (the caller) against fake worker services over real gRPC on loopback."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import grpc
import pytest

from baton.v1 import common_pb2
from router.backend import BackendError, BackendErrorKind, FinishReason, GenerateRequest, SamplingOptions
from router.cluster_backend import ClusterBackend, ClusterConfig
from router.placement import EmbeddedPlacementStore, WorkerRecord, WorkerRole
from router.policy import CacheAwarePolicy, RoundRobinPolicy
from tests.router.fake_workers import TOKEN_BASE, FakeDecode, FakePrefill, WorkerServer

pytestmark = pytest.mark.anyio
FP = "fp"
LONG = tuple(range(1, 200))  # well above the local-prefill threshold
SHORT = (1, 2, 3)


class Cluster:
    def __init__(self, stack: AsyncExitStack, store: EmbeddedPlacementStore) -> None:
        self.stack = stack
        self.store = store
        self.workers: dict[str, FakeDecode | FakePrefill] = {}
        self.records: dict[str, WorkerRecord] = {}

    async def add(self, servicer: FakeDecode | FakePrefill, fingerprint: str = FP, kv_address: str = "") -> None:
        server = await self.stack.enter_async_context(WorkerServer(servicer))
        role = WorkerRole.DECODE if isinstance(servicer, FakeDecode) else WorkerRole.PREFILL
        record = WorkerRecord(
            servicer.worker_id, role, server.address, fingerprint, 4, 1000, 1000, kv_transfer_address=kv_address
        )
        await self.store.register(record, ttl_s=60)
        self.workers[servicer.worker_id] = servicer
        self.records[servicer.worker_id] = record


@pytest.fixture
async def cluster():
    async with AsyncExitStack() as stack:
        yield Cluster(stack, EmbeddedPlacementStore())


def backend(cluster: Cluster, policy=None, **kw) -> ClusterBackend:
    config = ClusterConfig(model_fingerprint=FP, block_size=4, max_model_len=4096, vocab_size=10_000, **kw)
    return ClusterBackend(config, cluster.store, policy or CacheAwarePolicy(local_prefill_threshold=64))


def req(prompt=LONG, max_tokens=5, rid="r1", **kw) -> GenerateRequest:
    return GenerateRequest(rid, tuple(prompt), SamplingOptions(max_tokens=max_tokens, **kw))


async def collect(b: ClusterBackend, request: GenerateRequest):
    return [ev async for ev in b.generate(request)]


async def test_split_path_reserve_prefill_decode(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0"))
    await cluster.add(FakePrefill("p0"))
    b = backend(cluster)
    events = await collect(b, req(logprobs=True, seed=3, temperature=0.5))
    tokens = [t for ev in events for t in ev.token_ids]
    assert tokens == [TOKEN_BASE + i for i in range(5)]
    assert events[0].route.decision == "split" and events[0].route.prefill_worker == "p0"
    assert events[0].num_cached_tokens == 16
    assert events[0].logprobs[0].logprob == -0.25
    assert events[-1].finish_reason == FinishReason.LENGTH
    d, p = cluster.workers["d0"], cluster.workers["p0"]
    [prefill] = p.prefills
    # P starts before D's target exists (Reserve runs beside the prefill); the target follows.
    assert prefill.kv_target_follows and not prefill.HasField("kv_target")
    assert p.targets["r1"].handle_id == "h-r1" and list(prefill.prompt_token_ids) == list(LONG)
    assert prefill.sampling.seed == 3 and prefill.sampling.temperature == 0.5 and prefill.deadline_ms > 0
    [decode] = d.decodes
    assert decode.first_token_id == TOKEN_BASE and not decode.local_prefill
    assert d.aborted == [] and p.aborted == []


async def test_local_prefill_for_short_prompts(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0"))
    await cluster.add(FakePrefill("p0"))
    events = await collect(backend(cluster), req(prompt=SHORT, max_tokens=3))
    assert [t for ev in events for t in ev.token_ids] == [TOKEN_BASE, TOKEN_BASE + 1, TOKEN_BASE + 2]
    assert events[0].route.decision == "local" and events[0].num_cached_tokens == 8
    assert cluster.workers["p0"].prefills == []
    assert cluster.workers["d0"].decodes[0].local_prefill


async def test_first_token_that_finishes_the_request(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0"))
    await cluster.add(FakePrefill("p0"))
    events = await collect(backend(cluster), req(max_tokens=1))
    assert [t for ev in events for t in ev.token_ids] == [TOKEN_BASE]
    assert events[-1].finish_reason == FinishReason.LENGTH


async def test_reserve_refused_retries_on_another_decode_worker(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0", reserve_error=common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED))
    await cluster.add(FakeDecode("d1"))
    await cluster.add(FakePrefill("p0"))
    events = await collect(backend(cluster, policy=RoundRobinPolicy()), req())
    assert events[0].route.decode_worker == "d1"
    assert len([t for ev in events for t in ev.token_ids]) == 5
    # P was asked to start on the first placement too: that request was dropped there (its call
    # cancelled, possibly before it arrived, and aborted), the second placement's got d1's blocks.
    p = cluster.workers["p0"]
    assert p.prefills[-1].request_id == "r1#1" and list(p.targets) == ["r1#1"]
    assert "r1" in p.aborted


async def test_refused_kv_target_fails_the_sequence_with_the_prefill_worker_named(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0"))
    await cluster.add(FakePrefill("p0", target_error=common_pb2.ERROR_CODE_INVALID_ARGUMENT))
    with pytest.raises(BackendError) as raised:
        await collect(backend(cluster), req())
    assert "SetKVTarget on worker p0" in str(raised.value) and "target refused" in str(raised.value)
    assert cluster.workers["d0"].aborted == ["r1"] and cluster.workers["p0"].aborted == ["r1"]


async def test_prefill_failure_frees_the_reservation_and_uses_another_prefill_worker(
    cluster: Cluster,
) -> None:
    await cluster.add(FakeDecode("d0"))
    await cluster.add(FakePrefill("p0", error=common_pb2.ERROR_CODE_TRANSFER_FAILED))
    await cluster.add(FakePrefill("p1"))
    events = await collect(backend(cluster), req())
    assert events[0].route.prefill_worker == "p1"
    assert cluster.workers["d0"].aborted == ["r1"]  # the first attempt's reservation
    assert len(cluster.workers["d0"].decodes) == 1 and cluster.workers["d0"].decodes[0].request_id == "r1#1"


async def test_first_token_streams_before_the_kv_lands_and_a_later_transfer_failure_resumes(
    cluster: Cluster,
) -> None:
    # P answers the first token, then reports that its KV never arrived: the token already streamed is
    # kept, and D resumes from prompt + that token with a local prefill (no gap, no duplicate).
    await cluster.add(FakeDecode("d0"))
    await cluster.add(FakePrefill("p0", error_after_first=common_pb2.ERROR_CODE_TRANSFER_FAILED))
    events = await collect(backend(cluster), req(max_tokens=6))
    tokens = [t for ev in events for t in ev.token_ids]
    assert tokens == [TOKEN_BASE + i for i in range(6)]
    assert events[0].route.prefill_worker == "p0" and events[0].timing.transfer_ms is None
    resumed = cluster.workers["d0"].reservations["r1#1"]
    assert list(resumed.output_token_ids) == [TOKEN_BASE]
    decodes = cluster.workers["d0"].decodes
    # D may have been asked to decode the first attempt (before P reported the failure): that call
    # was cancelled. The resumed attempt prefills locally.
    assert [d.request_id for d in decodes if d.request_id != "r1"] == ["r1#1"] and decodes[-1].local_prefill
    assert cluster.workers["d0"].aborted == ["r1"]  # the first attempt's reservation


async def test_decode_is_asked_before_the_prefill_worker_acknowledges_the_kv(cluster: Cluster) -> None:
    # D waits for the KV itself, so the router asks it right after the first token: the second token
    # does not wait for P's acknowledgement and one more round trip.
    landed = asyncio.Event()
    await cluster.add(FakeDecode("d0"))
    await cluster.add(FakePrefill("p0", kv_landed=landed))
    run = asyncio.create_task(collect(backend(cluster), req(max_tokens=4)))
    for _ in range(500):
        if cluster.workers["d0"].decodes:
            break
        await asyncio.sleep(0.01)
    assert [d.request_id for d in cluster.workers["d0"].decodes] == ["r1"] and not run.done()
    landed.set()  # P acknowledges: the stream completes from D's tokens, each once
    events = await asyncio.wait_for(run, 30)
    assert [t for ev in events for t in ev.token_ids] == [TOKEN_BASE + i for i in range(4)]
    assert events[0].timing.transfer_ms == 0.0


async def test_first_token_from_decode_waits_for_the_decode_stream(cluster: Cluster) -> None:
    # first_token_from=decode: P's token reaches the client with D's first chunk (the request joined
    # D's batch), so the gap to the second token is one of D's steps, not the KV handoff.
    joined = asyncio.Event()
    await cluster.add(FakeDecode("d0", joins=joined))
    await cluster.add(FakePrefill("p0"))
    stream = backend(cluster, first_token_from="decode").generate(req(max_tokens=4, logprobs=True))
    first = asyncio.create_task(anext(stream))
    for _ in range(500):
        if cluster.workers["d0"].decodes:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert cluster.workers["d0"].decodes and not first.done()  # P answered; D has not started
    joined.set()
    event = await asyncio.wait_for(first, 30)
    assert event.token_ids == (TOKEN_BASE,) and event.logprobs[0].logprob == -0.25
    assert event.route.decision == "split" and event.num_cached_tokens == 16 and event.timing is not None
    rest = [ev async for ev in stream]
    assert [t for ev in [event, *rest] for t in ev.token_ids] == [TOKEN_BASE + i for i in range(4)]
    assert [lp.logprob for ev in rest for lp in ev.logprobs] == [-0.5] * 3
    assert rest[-1].finish_reason == FinishReason.LENGTH


@pytest.mark.parametrize("first_token_from", ["prefill", "decode"])
async def test_first_token_from_either_side_streams_each_token_once(
    cluster: Cluster, first_token_from: str
) -> None:
    await cluster.add(FakeDecode("d0", joins=True))
    await cluster.add(FakePrefill("p0"))
    b = backend(cluster, first_token_from=first_token_from)
    for max_tokens in (1, 5):
        events = await collect(b, req(max_tokens=max_tokens, rid=f"r{max_tokens}"))
        assert [t for ev in events for t in ev.token_ids] == [TOKEN_BASE + i for i in range(max_tokens)]
        assert events[0].token_ids == (TOKEN_BASE,) and events[0].route.prefill_worker == "p0"
        assert events[-1].finish_reason == FinishReason.LENGTH


async def test_held_first_token_is_not_kept_when_the_decode_worker_fails_before_starting(
    cluster: Cluster,
) -> None:
    # The held token was never the client's: the next placement starts over (a prefill again), it
    # does not resume from prompt + that token.
    await cluster.add(FakeDecode("d0", die_after_chunks=0))
    await cluster.add(FakeDecode("d1", joins=True))
    await cluster.add(FakePrefill("p0"))
    b = backend(cluster, policy=RoundRobinPolicy(), first_token_from="decode")
    events = await collect(b, req(max_tokens=4))
    assert [t for ev in events for t in ev.token_ids] == [TOKEN_BASE + i for i in range(4)]
    assert events[0].route.decode_worker == "d1"
    assert len(cluster.workers["p0"].prefills) == 2
    assert not cluster.workers["d1"].decodes[0].local_prefill


def test_first_token_from_is_checked() -> None:
    with pytest.raises(ValueError, match="first_token_from"):
        ClusterConfig(model_fingerprint=FP, block_size=4, max_model_len=4096, first_token_from="router")


async def test_split_trace_gets_the_transfer_time_after_the_first_token(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0"))
    await cluster.add(FakePrefill("p0"))
    events = await collect(backend(cluster), req(max_tokens=3))
    timing = events[0].timing
    assert events[0].token_ids == (TOKEN_BASE,)
    assert timing.prefill_done is not None and timing.transfer_ms == 0.0
    assert len(cluster.workers["d0"].decodes) == 1 and cluster.workers["d0"].decodes[0].first_token_id == TOKEN_BASE


async def test_decode_worker_dying_mid_stream_resumes_elsewhere(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0", die_after_chunks=2))
    await cluster.add(FakeDecode("d1"))
    await cluster.add(FakePrefill("p0"))
    events = await collect(backend(cluster, policy=RoundRobinPolicy()), req(max_tokens=8))
    tokens = [t for ev in events for t in ev.token_ids]
    assert tokens == [TOKEN_BASE + i for i in range(8)]  # no gap, no duplicate
    resumed = cluster.workers["d1"].reservations["r1#1"]
    assert list(resumed.output_token_ids) == [TOKEN_BASE + i for i in range(3)]
    assert cluster.workers["d1"].decodes[0].local_prefill
    assert len(cluster.workers["p0"].prefills) == 1


async def test_non_retryable_error_is_reported(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0", reserve_error=common_pb2.ERROR_CODE_INVALID_ARGUMENT))
    with pytest.raises(BackendError) as err:
        await collect(backend(cluster), req())
    assert err.value.kind == BackendErrorKind.INVALID_ARGUMENT
    assert "d0" in err.value.message and "INVALID_ARGUMENT" in err.value.message


async def test_retries_are_bounded(cluster: Cluster) -> None:
    for i in range(4):
        await cluster.add(FakeDecode(f"d{i}", reserve_error=common_pb2.ERROR_CODE_UNAVAILABLE))
    with pytest.raises(BackendError) as err:
        await collect(backend(cluster, max_attempts=3), req(prompt=SHORT))
    assert err.value.kind == BackendErrorKind.UNAVAILABLE
    # Three attempts, each on a different worker; the fourth worker is never asked.
    assert sorted(w.reserve_calls for w in cluster.workers.values()) == [0, 1, 1, 1]


async def test_a_full_cluster_is_waited_for_not_failed(cluster: Cluster) -> None:
    # Both decode workers are full for their first three Reserves (backpressure, not a fault).
    for i in range(2):
        await cluster.add(
            FakeDecode(f"d{i}", reserve_error=common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED, reserve_error_calls=3)
        )
    events = await collect(backend(cluster, max_attempts=1, overload_wait_s=10.0), req(prompt=SHORT))
    assert len([t for ev in events for t in ev.token_ids]) == 5
    assert sorted(w.reserve_calls for w in cluster.workers.values()) == [3, 4]
    served = events[0].route.decode_worker
    assert list(cluster.workers[served].reservations) == [f"r1#{events[0].timing.attempts - 1}"]


async def test_a_full_cluster_fails_once_the_wait_is_over(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0", reserve_error=common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED))
    start = asyncio.get_running_loop().time()
    with pytest.raises(BackendError) as err:
        await collect(backend(cluster, overload_wait_s=0.3), req(prompt=SHORT))
    assert err.value.kind == BackendErrorKind.OVERLOADED and "d0" in err.value.message
    assert 0.3 <= asyncio.get_running_loop().time() - start < 3.0
    assert cluster.workers["d0"].reserve_calls >= 3  # tried again while waiting


async def test_early_exit_aborts_on_the_workers(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0"))
    b = backend(cluster)
    stream = b.generate(req(prompt=SHORT, max_tokens=50))
    await anext(stream)
    await stream.aclose()
    assert cluster.workers["d0"].aborted == ["r1"]
    await b.abort("r1")  # idempotent: nothing left to abort
    assert cluster.workers["d0"].aborted == ["r1"]


async def test_abort_from_outside_while_streaming(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0"))
    b = backend(cluster)
    stream = b.generate(req(prompt=SHORT, max_tokens=50))
    await anext(stream)
    await b.abort("r1")
    assert cluster.workers["d0"].aborted == ["r1"]
    await stream.aclose()


async def test_decode_deadline(cluster: Cluster) -> None:
    await cluster.add(FakeDecode("d0", hang=True))
    with pytest.raises(BackendError) as err:
        await asyncio.wait_for(collect(backend(cluster, decode_timeout_s=0.3), req(prompt=SHORT)), timeout=10)
    assert err.value.kind == BackendErrorKind.TIMEOUT


async def test_unreachable_worker_is_unavailable(cluster: Cluster) -> None:
    record = WorkerRecord("d0", WorkerRole.DECODE, "127.0.0.1:1", FP, 4, 100, 100)
    await cluster.store.register(record, ttl_s=60)
    with pytest.raises(BackendError) as err:
        await collect(backend(cluster, max_attempts=1, reserve_timeout_s=2.0), req(prompt=SHORT))
    assert err.value.kind in (BackendErrorKind.UNAVAILABLE, BackendErrorKind.TIMEOUT)


async def test_readiness_follows_the_registry(cluster: Cluster) -> None:
    b = backend(cluster, refresh_interval_s=0.05)
    await b.start()
    try:
        assert not b.ready()
        with pytest.raises(BackendError) as err:
            await collect(b, req())
        assert err.value.kind == BackendErrorKind.UNAVAILABLE
        await cluster.add(FakeDecode("dx"), fingerprint="another-model")
        await asyncio.sleep(0.2)
        assert not b.ready()  # a worker of another model does not count
        await cluster.add(FakeDecode("d0"))
        await asyncio.sleep(0.2)
        assert b.ready()
        events = await collect(b, req(prompt=SHORT, max_tokens=2))
        assert events[0].route.decode_worker == "d0"
    finally:
        await b.close()


async def _settled(b: ClusterBackend) -> None:
    """Refresh, then let the Connect calls it started finish."""
    await b.refresh()
    await asyncio.gather(*list(b._links._calls))


async def test_prefill_workers_are_asked_to_open_kv_links_once_per_pair(cluster: Cluster) -> None:
    await cluster.add(FakePrefill("p0"))
    await cluster.add(FakeDecode("d0"), kv_address="10.0.0.1:7001")
    await cluster.add(FakeDecode("d1"), kv_address="10.0.0.2:7001")
    await cluster.add(FakeDecode("d2"), fingerprint="other", kv_address="10.0.0.3:7001")  # not our model
    b = backend(cluster)
    try:
        await _settled(b)
        p0 = cluster.workers["p0"]
        assert p0.connects == [["10.0.0.1:7001", "10.0.0.2:7001"]]
        await _settled(b)
        assert len(p0.connects) == 1, "asked again about pairs already asked about"

        await cluster.add(FakePrefill("p1"))  # a new prefill worker: asked about every decode worker
        await _settled(b)
        assert cluster.workers["p1"].connects == [["10.0.0.1:7001", "10.0.0.2:7001"]]
        assert len(p0.connects) == 1

        await cluster.store.deregister("d1")  # gone, then back (say, restarted): asked again
        await _settled(b)
        await cluster.store.register(cluster.records["d1"], ttl_s=60)
        await _settled(b)
        assert p0.connects[1:] == [["10.0.0.2:7001"]] and cluster.workers["p1"].connects[1:] == [["10.0.0.2:7001"]]
    finally:
        await b.close()


@pytest.mark.parametrize("status", ["UNAVAILABLE", "UNIMPLEMENTED"])
async def test_a_failed_link_request_is_retried_unless_the_worker_lacks_the_call(cluster: Cluster, status) -> None:
    await cluster.add(FakePrefill("p0", connect_status=getattr(grpc.StatusCode, status)))
    await cluster.add(FakeDecode("d0"), kv_address="10.0.0.1:7001")
    b = backend(cluster)
    try:
        await _settled(b)
        await _settled(b)
        asked = cluster.workers["p0"].connects
        assert asked == ([["10.0.0.1:7001"]] * 2 if status == "UNAVAILABLE" else [["10.0.0.1:7001"]])
        assert b.ready()  # a worker that cannot open links ahead still serves
    finally:
        await b.close()
