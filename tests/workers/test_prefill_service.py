"""The prefill worker's gRPC servicer, against a stand-in worker: what it does before any work."""

from __future__ import annotations

from types import SimpleNamespace

from baton.v1 import common_pb2, worker_pb2
from prefill_worker.service import PrefillServicer


class _Worker:
    """Only what the servicer reads before admitting a request; admitting one is a test failure."""

    fingerprint = "fp"
    vocab_size = 1000
    engine = SimpleNamespace(max_model_len=4096)

    def __init__(self) -> None:
        self.admitted: list[str] = []

    def prefill_stream(self, request_id, *args):
        self.admitted.append(request_id)
        yield from ()


class _CancelledContext:
    """An RPC already cancelled when its handler runs: no callback can be registered any more."""

    def add_callback(self, callback) -> bool:
        return False

    def is_active(self) -> bool:
        return False

    def invocation_metadata(self):
        return ()


def test_a_prefill_cancelled_before_it_started_is_not_admitted() -> None:
    worker = _Worker()
    servicer = PrefillServicer(worker, "127.0.0.1:1")
    request = worker_pb2.PrefillRequest(
        request_id="gone", prompt_token_ids=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=4),
        kv_target_follows=True,
    )  # fmt: skip
    [answer] = list(servicer.PrefillStream(request, _CancelledContext()))
    assert answer.error.code == common_pb2.ERROR_CODE_ABORTED and "went away" in answer.error.message
    assert worker.admitted == []
