"""gRPC DecodeService: translates between ``baton.v1`` messages and ``DecodeWorker``.

Domain exceptions become ``Error`` messages in one place (``_error``); nothing else here has policy.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc

from baton.convert import (
    check_token_ids,
    chunk_from_output,
    error,
    health_response,
    kv_events_response,
    logprob_from_proto,
    sampling_from_proto,
    worker_info,
)
from baton.grpc_auth import SecretAuthInterceptor, add_standard_health
from baton.tracing import request_id_from_metadata
from baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from decode_worker.scheduler import Refused
from decode_worker.worker import DecodeWorker
from kv_transfer.wire import handle_to_kv_target

log = logging.getLogger(__name__)
SERVICE_NAME = "baton.v1.DecodeService"


def _error(e: Exception) -> common_pb2.Error:
    if isinstance(e, Refused):
        return error(getattr(common_pb2, f"ERROR_CODE_{e.code}"), str(e), e.retryable)
    if isinstance(e, ValueError):
        return error(common_pb2.ERROR_CODE_INVALID_ARGUMENT, str(e))
    log.exception("decode failed")
    return error(common_pb2.ERROR_CODE_INTERNAL, f"{type(e).__name__}: {e}", retryable=True)


class DecodeServicer(worker_pb2_grpc.DecodeServiceServicer):
    def __init__(self, worker: DecodeWorker, address: str) -> None:
        self.worker = worker
        self.address = address
        self._sampling: dict[str, tuple[bool, bool]] = {}  # request id -> (logprobs, top_logprobs)

    def Reserve(self, request, context):
        w = self.worker
        try:
            prompt = check_token_ids(request.prompt_token_ids, w.vocab_size, "prompt_token_ids")
            outputs = check_token_ids(request.output_token_ids, w.vocab_size, "output_token_ids")
            sampling = sampling_from_proto(request.sampling, w.engine.max_model_len, w.vocab_size)
            deadline = request.deadline_ms / 1000 if request.deadline_ms else None
            handle = w.reserve(request.request_id, prompt, sampling, outputs, deadline)
        except Exception as e:
            return worker_pb2.ReserveResponse(error=_error(e))
        self._sampling[request.request_id] = (sampling.logprobs is not None, bool(sampling.logprobs))
        return worker_pb2.ReserveResponse(handle=handle_to_kv_target(handle, w.fingerprint))

    def Decode(self, request, context):
        w = self.worker
        rid = request.request_id
        with_lp, with_top = self._sampling.pop(rid, (False, False))
        first = request.first_token_id if request.HasField("first_token_id") else None
        first_lp = logprob_from_proto(
            request.first_token_logprob if request.HasField("first_token_logprob") else None,
            request.first_token_top_logprobs if request.HasField("first_token_top_logprobs") else None,
        )
        deadline = request.deadline_ms / 1000 if request.deadline_ms else None
        log.debug("decode %s (request %s): local_prefill=%s", rid, request_id_from_metadata(context.invocation_metadata()) or "-", request.local_prefill)
        outputs = w.decode(rid, first, first_lp, request.local_prefill, deadline, is_active=context.is_active)
        sent_first = False
        try:
            for out in outputs:
                chunk = chunk_from_output(out, with_lp, with_top)
                if not sent_first:
                    chunk.num_prompt_tokens = out.num_prompt_tokens
                    chunk.num_cached_tokens = out.num_cached_tokens
                    sent_first = True
                yield worker_pb2.DecodeResponse(chunk=chunk)
        except Exception as e:
            yield worker_pb2.DecodeResponse(error=_error(e))
        finally:
            outputs.close()

    def Abort(self, request, context):
        self._sampling.pop(request.request_id, None)
        return worker_pb2.AbortResponse(found=self.worker.abort(request.request_id, request.reason or "aborted"))

    def GetInfo(self, request, context):
        return worker_info(self.worker, common_pb2.WORKER_ROLE_DECODE, self.address, self.worker.kv_address)

    def HealthCheck(self, request, context):
        return health_response(self.worker)

    def GetKVEvents(self, request, context):
        return kv_events_response(self.worker, request.after_sequence)


def serve(worker: DecodeWorker, host: str, port: int, secret: str, max_threads: int = 128) -> tuple[grpc.Server, str]:
    """Start the gRPC server (authenticated; grpc.health.v1 open for probes). Returns (server, address)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads), interceptors=[SecretAuthInterceptor(secret)])
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    address = f"{host}:{bound}"
    worker_pb2_grpc.add_DecodeServiceServicer_to_server(DecodeServicer(worker, address), server)
    add_standard_health(server, SERVICE_NAME)
    server.start()
    return server, address
