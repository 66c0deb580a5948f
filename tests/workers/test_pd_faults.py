"""Faults on the P -> D path (real processes, gloo): no hang, a clear error, and block integrity on the
surviving side (every block free or cached again) within the deadline."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from baton.grpc_auth import auth_metadata
from baton.pd_driver import PDDriver
from baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.workers.cluster import SECRET, WorkerProcess

MODEL = "default"  # real model: slow enough on CPU that "mid-transfer" lasts seconds
COMMON = ["--block-size", "16", "--num-kv-blocks", "512"]
LONG_PROMPT = [(13 * i) % 40000 + 100 for i in range(1500)]
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
MD = auth_metadata(SECRET)


def _deadline_ms(s: float) -> int:
    return int((time.time() + s) * 1000)


def _stubs(p: WorkerProcess | None, d: WorkerProcess):
    dstub = worker_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(d.address))
    pstub = worker_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)) if p else None
    return pstub, dstub


def _reserve(dstub, rid, prompt, seconds=30.0):
    r = dstub.Reserve(worker_pb2.ReserveRequest(request_id=rid, prompt_token_ids=prompt, sampling=GREEDY, deadline_ms=_deadline_ms(seconds)), metadata=MD, timeout=10)
    assert r.HasField("handle"), r.error
    return r.handle


@pytest.fixture()
def pair():
    d = WorkerProcess("decode", MODEL, *COMMON)
    p = WorkerProcess("prefill", MODEL, *COMMON, "--chunk", "32")
    yield p, d
    p.stop()
    d.stop()


def test_abort_in_each_phase(pair):
    p, d = pair
    pstub, dstub = _stubs(p, d)
    # queued: reserved on D, never prefilled.
    _reserve(dstub, "q", LONG_PROMPT[:100])
    assert dstub.Abort(worker_pb2.AbortRequest(request_id="q"), metadata=MD, timeout=10).found
    d.wait_idle_and_clean()

    # prefilling / transferring: abort P while the long prompt is being prefilled and shipped.
    handle = _reserve(dstub, "pf", LONG_PROMPT)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", pstub.Prefill(worker_pb2.PrefillRequest(
        request_id="pf", prompt_token_ids=LONG_PROMPT, sampling=GREEDY, kv_target=handle, deadline_ms=_deadline_ms(60)), metadata=MD, timeout=60)))
    t.start()
    time.sleep(1.5)
    pstub.Abort(worker_pb2.AbortRequest(request_id="pf"), metadata=MD, timeout=10)
    t.join(30)
    assert not t.is_alive()
    assert box["r"].HasField("error") and box["r"].error.code == common_pb2.ERROR_CODE_ABORTED
    dstub.Abort(worker_pb2.AbortRequest(request_id="pf"), metadata=MD, timeout=10)
    p.wait_idle_and_clean()
    d.wait_idle_and_clean()

    # decoding: start a stream, abort mid-way: the stream ends with ABORT.
    drv = PDDriver(p.address, d.address, SECRET)
    handle = _reserve(dstub, "dec", LONG_PROMPT[:40])
    pre = pstub.Prefill(worker_pb2.PrefillRequest(request_id="dec", prompt_token_ids=LONG_PROMPT[:40], sampling=GREEDY, kv_target=handle), metadata=MD, timeout=60)
    assert pre.HasField("result")
    stream = dstub.Decode(worker_pb2.DecodeRequest(request_id="dec", first_token_id=pre.result.first_token_id), metadata=MD, timeout=60)
    first = next(stream)
    assert first.HasField("chunk")
    dstub.Abort(worker_pb2.AbortRequest(request_id="dec"), metadata=MD, timeout=10)
    last = list(stream)[-1]
    assert last.chunk.finish_reason == common_pb2.FINISH_REASON_ABORT
    d.wait_idle_and_clean()
    # Both workers still serve.
    assert drv.run("after", LONG_PROMPT[:20], GREEDY).error is None


def test_prefill_killed_mid_transfer(pair):
    p, d = pair
    pstub, dstub = _stubs(p, d)
    handle = _reserve(dstub, "k", LONG_PROMPT, seconds=8.0)
    call = pstub.Prefill.future(worker_pb2.PrefillRequest(request_id="k", prompt_token_ids=LONG_PROMPT, sampling=GREEDY, kv_target=handle), metadata=MD, timeout=60)
    time.sleep(1.5)
    p.kill()
    with pytest.raises(grpc.RpcError) as err:
        call.result(timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The decode side gives up on its own: failed transfer / reservation deadline, blocks freed.
    msgs = list(dstub.Decode(worker_pb2.DecodeRequest(request_id="k", first_token_id=5), metadata=MD, timeout=30))
    assert msgs[-1].HasField("error")
    assert msgs[-1].error.code in (common_pb2.ERROR_CODE_TRANSFER_FAILED, common_pb2.ERROR_CODE_DEADLINE_EXCEEDED)
    d.wait_idle_and_clean(timeout=15)


def test_decode_killed_mid_transfer(pair):
    p, d = pair
    pstub, dstub = _stubs(p, d)
    handle = _reserve(dstub, "k2", LONG_PROMPT)
    call = pstub.Prefill.future(worker_pb2.PrefillRequest(request_id="k2", prompt_token_ids=LONG_PROMPT, sampling=GREEDY, kv_target=handle, deadline_ms=_deadline_ms(30)), metadata=MD, timeout=60)
    time.sleep(1.5)
    d.kill()
    t0 = time.time()
    res = call.result(timeout=60)
    assert res.HasField("error") and res.error.code in (common_pb2.ERROR_CODE_TRANSFER_FAILED, common_pb2.ERROR_CODE_DEADLINE_EXCEEDED)
    assert res.error.retryable
    assert time.time() - t0 < 35
    p.wait_idle_and_clean()


def test_forged_descriptors_are_rejected(pair):
    p, d = pair
    pstub, dstub = _stubs(p, d)
    prompt = LONG_PROMPT[:50]
    good = _reserve(dstub, "f", prompt)
    forged = []
    t = worker_pb2.KVTarget()
    t.CopyFrom(good)
    t.block_ids.append(3)  # more blocks than the prompt needs
    forged.append(t)
    t = worker_pb2.KVTarget()
    t.CopyFrom(good)
    t.layout.num_layers += 1  # wrong layout
    forged.append(t)
    t = worker_pb2.KVTarget()
    t.CopyFrom(good)
    t.handle_id = "not-a-handle"  # unknown reservation on D
    forged.append(t)
    t = worker_pb2.KVTarget()
    t.CopyFrom(good)
    t.block_ids[0] = 10**6  # out of D's range
    forged.append(t)
    for i, target in enumerate(forged):
        r = pstub.Prefill(worker_pb2.PrefillRequest(request_id=f"forged-{i}", prompt_token_ids=prompt, sampling=GREEDY, kv_target=target, deadline_ms=_deadline_ms(20)), metadata=MD, timeout=30)
        assert r.HasField("error"), f"forged target {i} accepted"
        assert r.error.message
    # The genuine reservation is unharmed by forged attempts against other handles; clean up.
    dstub.Abort(worker_pb2.AbortRequest(request_id="f"), metadata=MD, timeout=10)
    p.wait_idle_and_clean()
    d.wait_idle_and_clean()
    # Unauthenticated callers are refused outright.
    with pytest.raises(grpc.RpcError) as err:
        dstub.GetInfo(common_pb2.GetInfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_peer_that_never_answers(pair):
    p, d = pair
    pstub, dstub = _stubs(p, d)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never says a word
    try:
        target = _reserve(dstub, "s", LONG_PROMPT[:50])
        target.transfer_address = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.time()
        r = pstub.Prefill(worker_pb2.PrefillRequest(request_id="s", prompt_token_ids=LONG_PROMPT[:50], sampling=GREEDY, kv_target=target, deadline_ms=_deadline_ms(15)), metadata=MD, timeout=60)
        assert r.HasField("error") and r.error.code in (common_pb2.ERROR_CODE_TRANSFER_FAILED, common_pb2.ERROR_CODE_DEADLINE_EXCEEDED)
        assert time.time() - t0 < 20
        p.wait_idle_and_clean()
        dstub.Abort(worker_pb2.AbortRequest(request_id="s"), metadata=MD, timeout=10)
        d.wait_idle_and_clean()
    finally:
        silent.close()


def test_connect_opens_the_kv_link_ahead_of_the_first_transfer(pair):
    """The router's warm-up: P opens its link to D before any request needs it; bad input is refused."""
    p, d = pair
    pstub, dstub = _stubs(p, d)
    kv_address = d.info().kv_transfer_address
    assert kv_address
    first = pstub.Connect(worker_pb2.ConnectRequest(kv_transfer_addresses=[kv_address]), metadata=MD, timeout=10)
    assert first.opening == 1
    again = pstub.Connect(worker_pb2.ConnectRequest(kv_transfer_addresses=[kv_address, kv_address]), metadata=MD, timeout=10)
    assert again.opening == 0, "open or opening already: not opened twice"
    with pytest.raises(grpc.RpcError) as err:
        pstub.Connect(worker_pb2.ConnectRequest(kv_transfer_addresses=["no-port"]), metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "host:port" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        pstub.Connect(worker_pb2.ConnectRequest(kv_transfer_addresses=[kv_address]), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The first request over the opened link goes through as any other.
    prompt = LONG_PROMPT[:50]
    target = _reserve(dstub, "warm", prompt)
    r = pstub.Prefill(worker_pb2.PrefillRequest(request_id="warm", prompt_token_ids=prompt, sampling=GREEDY, kv_target=target, deadline_ms=_deadline_ms(30)), metadata=MD, timeout=60)
    assert r.HasField("result"), r.error
    dstub.Abort(worker_pb2.AbortRequest(request_id="warm"), metadata=MD, timeout=10)
    p.wait_idle_and_clean()
    d.wait_idle_and_clean()


def _prefill_follows(pstub, rid, prompt, seconds=30.0):
    """PrefillStream started without a target (it follows by SetKVTarget); its answers, as a call."""
    request = worker_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=GREEDY, deadline_ms=_deadline_ms(seconds), kv_target_follows=True
    )
    return pstub.PrefillStream(request, metadata=MD, timeout=60)


def _set_target(pstub, rid, target):
    return pstub.SetKVTarget(worker_pb2.SetKVTargetRequest(request_id=rid, kv_target=target), metadata=MD, timeout=10)


def test_kv_target_that_follows_the_prefill(pair):
    """P starts on a prompt before D's target exists; the target may come after or even before the
    request, is checked against the prompt, is taken once, and one that never comes ends the request
    at its deadline with every block free again."""
    p, d = pair
    pstub, dstub = _stubs(p, d)
    prompt = LONG_PROMPT[:50]
    # The target before its request: held (once), then used.
    target = _reserve(dstub, "early", prompt)
    assert _set_target(pstub, "early", target).accepted
    again = _set_target(pstub, "early", target)
    assert again.HasField("error") and "already has a KV target" in again.error.message
    answers = list(_prefill_follows(pstub, "early", prompt))
    assert [a.result.kv_pending for a in answers] == [True, False], answers
    stream = dstub.Decode(worker_pb2.DecodeRequest(request_id="early", first_token_id=answers[0].result.first_token_id), metadata=MD, timeout=60)
    assert not list(stream)[-1].HasField("error")
    # After its request: a wrong one is refused (the request keeps waiting).
    call = _prefill_follows(pstub, "late", prompt)
    first = next(call)
    assert first.result.kv_pending  # the first token does not wait for the target
    target = _reserve(dstub, "late", prompt)
    wrong = worker_pb2.KVTarget()
    wrong.CopyFrom(target)
    wrong.block_ids.append(3)
    refused = _set_target(pstub, "late", wrong)
    assert refused.HasField("error") and refused.error.code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
    assert _set_target(pstub, "late", target).accepted
    last = next(call)
    assert last.HasField("result") and not last.result.kv_pending, last
    dstub.Abort(worker_pb2.AbortRequest(request_id="late"), metadata=MD, timeout=10)
    # Taken once while its request runs: here its KV goes to a peer that never answers, so the
    # request is still running when the second target comes (it then ends at its deadline).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        call = _prefill_follows(pstub, "twice", prompt, seconds=3.0)
        assert next(call).result.kv_pending
        stuck = _reserve(dstub, "twice", prompt)
        stuck.transfer_address = f"127.0.0.1:{silent.getsockname()[1]}"
        assert _set_target(pstub, "twice", stuck).accepted
        again = _set_target(pstub, "twice", stuck)
        assert again.HasField("error") and "already has a KV target" in again.error.message
        assert next(call).HasField("error")
    finally:
        silent.close()
    dstub.Abort(worker_pb2.AbortRequest(request_id="twice"), metadata=MD, timeout=10)
    # A target said to follow and given at once is a malformed request.
    both = worker_pb2.PrefillRequest(request_id="both", prompt_token_ids=prompt, sampling=GREEDY, kv_target=target, kv_target_follows=True)
    r = pstub.Prefill(both, metadata=MD, timeout=10)
    assert r.HasField("error") and r.error.code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
    # Never given: the first token comes, then the deadline ends the request and frees its blocks.
    t0 = time.time()
    answers = list(_prefill_follows(pstub, "never", prompt, seconds=3.0))
    assert answers[0].HasField("result") and answers[-1].HasField("error"), answers
    assert answers[-1].error.code == common_pb2.ERROR_CODE_DEADLINE_EXCEEDED
    assert time.time() - t0 < 10
    p.wait_idle_and_clean()
    d.wait_idle_and_clean()
