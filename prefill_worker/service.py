"""gRPC PrefillService: translates between ``baton.v1`` messages and ``PrefillWorker``.

Domain exceptions become ``Error`` messages in one place (``_error``); nothing else here has policy.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc

from baton.convert import (
    check_token_ids,
    error,
    health_response,
    kv_events_response,
    logprob_to_proto,
    sampling_from_proto,
    worker_info,
)
from baton.grpc_auth import SecretAuthInterceptor, add_standard_health
from baton.tracing import request_id_from_metadata
from baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kv_transfer.wire import handle_from_kv_target
from prefill_worker.scheduler import PrefillFailed
from prefill_worker.worker import PrefillWorker

log = logging.getLogger(__name__)
SERVICE_NAME = "baton.v1.PrefillService"


def _error(e: Exception) -> common_pb2.Error:
    if isinstance(e, PrefillFailed):
        return error(getattr(common_pb2, f"ERROR_CODE_{e.code}"), str(e), e.retryable)
    if isinstance(e, ValueError):
        return error(common_pb2.ERROR_CODE_INVALID_ARGUMENT, str(e))
    log.exception("prefill failed")
    return error(common_pb2.ERROR_CODE_INTERNAL, f"{type(e).__name__}: {e}", retryable=True)


class PrefillServicer(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(self, worker: PrefillWorker, address: str) -> None:
        self.worker = worker
        self.address = address

    def Prefill(self, request, context):
        try:
            *_, out = self._run(request, context)
        except Exception as e:
            return worker_pb2.PrefillResponse(error=_error(e))
        self._log(request, context, out)
        return worker_pb2.PrefillResponse(result=_result(out, kv_pending=False))

    def PrefillStream(self, request, context):
        pending = True
        try:
            for out in self._run(request, context):
                yield worker_pb2.PrefillResponse(result=_result(out, kv_pending=pending))
                pending = False
        except Exception as e:
            yield worker_pb2.PrefillResponse(error=_error(e))
            return
        self._log(request, context, out)

    def _run(self, request, context):
        """The worker's two outcomes for ``request`` (first token, then KV delivered)."""
        w = self.worker
        prompt = check_token_ids(request.prompt_token_ids, w.vocab_size, "prompt_token_ids")
        sampling = sampling_from_proto(request.sampling, w.engine.max_model_len, w.vocab_size)
        if request.kv_target_follows:
            if request.HasField("kv_target"):
                raise ValueError("kv_target is given and said to follow; send one or the other")
            handle = None
        else:
            handle = self._target(request.request_id, request.kv_target)
        deadline = request.deadline_ms / 1000 if request.deadline_ms else None
        if not context.add_callback(lambda: None if context.is_active() else w.abort(request.request_id, "client went away")):
            # Cancelled before it got here (a router drops P's request when D's Reserve is refused).
            raise PrefillFailed("ABORTED", "the caller went away before the prefill started", retryable=False)
        return w.prefill_stream(request.request_id, prompt, sampling, handle, deadline)

    def SetKVTarget(self, request, context):
        try:
            self.worker.set_kv_target(request.request_id, self._target(request.request_id, request.kv_target))
        except Exception as e:
            return worker_pb2.SetKVTargetResponse(error=_error(e))
        return worker_pb2.SetKVTargetResponse(accepted=True)

    def _target(self, request_id: str, kv_target: worker_pb2.KVTarget):
        if kv_target.model_fingerprint and kv_target.model_fingerprint != self.worker.fingerprint:
            raise PrefillFailed("FINGERPRINT_MISMATCH", "decode worker serves a different model/layout", retryable=False)
        return handle_from_kv_target(kv_target, request_id)

    @staticmethod
    def _log(request, context, out) -> None:
        log.info(
            "prefill %s (request %s): prompt_tokens=%d cached_tokens=%d blocks_sent=%d prefill_ms=%.1f transfer_ms=%.1f D=%s",
            request.request_id, request_id_from_metadata(context.invocation_metadata()) or "-", out.num_prompt_tokens,
            out.num_cached_tokens, out.num_transferred_blocks, out.prefill_ms, out.transfer_ms, request.kv_target.decode_worker_id,
        )  # fmt: skip

    def Abort(self, request, context):
        return worker_pb2.AbortResponse(found=self.worker.abort(request.request_id, request.reason or "aborted"))

    def GetInfo(self, request, context):
        return worker_info(self.worker, common_pb2.WORKER_ROLE_PREFILL, self.address, "")

    def HealthCheck(self, request, context):
        return health_response(self.worker)

    def GetKVEvents(self, request, context):
        return kv_events_response(self.worker, request.after_sequence)

    def Connect(self, request, context):
        try:
            opening = self.worker.connect(request.kv_transfer_addresses)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return worker_pb2.ConnectResponse(opening=opening)


def _result(out, kv_pending: bool) -> worker_pb2.PrefillResult:
    result = worker_pb2.PrefillResult(
        first_token_id=out.first_token_id,
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        num_transferred_blocks=0 if kv_pending else out.num_transferred_blocks,
        prefill_ms=out.prefill_ms,
        transfer_ms=0.0 if kv_pending else out.transfer_ms,
        kv_pending=kv_pending,
    )
    first, top = logprob_to_proto(out.first_token_id, out.first_logprob)
    if first is not None:
        result.first_token_logprob.CopyFrom(first)
        result.first_token_top_logprobs.CopyFrom(top)
    return result


def serve(worker: PrefillWorker, host: str, port: int, secret: str, max_threads: int = 64) -> tuple[grpc.Server, str]:
    """Start the gRPC server (authenticated; grpc.health.v1 open for probes). Returns (server, address)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads), interceptors=[SecretAuthInterceptor(secret)])
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    address = f"{host}:{bound}"
    worker_pb2_grpc.add_PrefillServiceServicer_to_server(PrefillServicer(worker, address), server)
    add_standard_health(server, SERVICE_NAME)
    server.start()
    return server, address
