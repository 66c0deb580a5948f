"""In-process fake prefill/decode workers implementing the ``baton.v1`` worker services on loopback.

They let the cluster backend (the caller) be unit-tested over real gRPC. Generation is scripted:
token ``i`` of a sequence is ``TOKEN_BASE + i``; the prefill worker samples token 0, the decode worker
continues from the number of tokens it was given (first token and/or ``output_token_ids``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from baton.grpc_auth import auth_metadata
from baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc

TOKEN_BASE = 100


@dataclass
class FakeDecode(worker_pb2_grpc.DecodeServiceServicer):
    worker_id: str
    address: str = ""  # set by WorkerServer
    reserve_error: int | None = None  # an ErrorCode to refuse Reserve with
    reserve_error_calls: int | None = None  # refuse only this many calls (None: every call)
    die_after_chunks: int | None = None  # abort the Decode stream with UNAVAILABLE after this many chunks
    hang: bool = False  # never send a chunk
    # Like a real decode worker, start a split request's stream with a tokenless chunk once it joins
    # the batch; when an Event, only once it is set.
    joins: bool | asyncio.Event = False
    secret: str = ""  # when set, calls without the shared-secret token are refused, as real workers do
    reserve_calls: int = 0
    reservations: dict[str, worker_pb2.ReserveRequest] = field(default_factory=dict)
    decodes: list[worker_pb2.DecodeRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)

    async def _authenticate(self, context) -> None:
        if self.secret and dict(context.invocation_metadata()).get("authorization") != dict(
            auth_metadata(self.secret)
        ).get("authorization"):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong shared-secret token")

    async def Reserve(self, request, context):
        await self._authenticate(context)
        self.reserve_calls += 1
        refusing = self.reserve_error_calls is None or self.reserve_calls <= self.reserve_error_calls
        if self.reserve_error is not None and refusing:
            return worker_pb2.ReserveResponse(error=common_pb2.Error(code=self.reserve_error, message="full"))
        self.reservations[request.request_id] = request
        handle = worker_pb2.KVTarget(
            decode_worker_id=self.worker_id,
            handle_id=f"h-{request.request_id}",
            block_ids=list(range(len(request.prompt_token_ids) // 4 + 1)),
            num_tokens=len(request.prompt_token_ids),
        )
        return worker_pb2.ReserveResponse(handle=handle)

    async def Decode(self, request, context):
        await self._authenticate(context)
        self.decodes.append(request)
        reservation = self.reservations.get(request.request_id)
        if reservation is None:
            yield worker_pb2.DecodeResponse(
                error=common_pb2.Error(code=common_pb2.ERROR_CODE_NOT_FOUND, message="no reservation")
            )
            return
        if self.hang:
            await asyncio.sleep(3600)
        s = reservation.sampling
        done = len(reservation.output_token_ids) + (1 if request.HasField("first_token_id") else 0)
        if self.joins and not request.local_prefill:
            if isinstance(self.joins, asyncio.Event):
                await self.joins.wait()
            joined = common_pb2.TokenChunk(num_prompt_tokens=len(reservation.prompt_token_ids))
            if done >= s.max_tokens:  # the first token already ended it
                joined.finish_reason = common_pb2.FINISH_REASON_LENGTH
            yield worker_pb2.DecodeResponse(chunk=joined)
            if done >= s.max_tokens:
                return
        for n_chunk, i in enumerate(range(done, s.max_tokens)):
            if self.die_after_chunks is not None and n_chunk >= self.die_after_chunks:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker going away")
            chunk = common_pb2.TokenChunk(token_ids=[TOKEN_BASE + i])
            if s.logprobs:
                chunk.logprobs.add(token_id=TOKEN_BASE + i, logprob=-0.5)
            if request.local_prefill and n_chunk == 0:
                chunk.num_prompt_tokens = len(reservation.prompt_token_ids)
                chunk.num_cached_tokens = 8
            if i == s.max_tokens - 1:
                chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
            yield worker_pb2.DecodeResponse(chunk=chunk)
            await asyncio.sleep(0)
        if done >= s.max_tokens:  # the first token already ended it
            yield worker_pb2.DecodeResponse(
                chunk=common_pb2.TokenChunk(finish_reason=common_pb2.FINISH_REASON_LENGTH)
            )

    async def Abort(self, request, context):
        self.aborted.append(request.request_id)
        return worker_pb2.AbortResponse(found=self.reservations.pop(request.request_id, None) is not None)

    async def GetInfo(self, request, context):
        await self._authenticate(context)
        return info(
            self.worker_id, common_pb2.WORKER_ROLE_DECODE, self.address, num_running=len(self.reservations)
        )

    async def GetKVEvents(self, request, context):
        return no_kv_events(request)


@dataclass
class FakePrefill(worker_pb2_grpc.PrefillServiceServicer):
    worker_id: str
    address: str = ""  # set by WorkerServer
    error: int | None = None  # an ErrorCode to fail Prefill with
    error_after_first: int | None = None  # PrefillStream: fail with this ErrorCode after the first token
    kv_landed: asyncio.Event | None = None  # PrefillStream: its second answer waits for this
    connect_status: grpc.StatusCode | None = None  # fail Connect with this status
    target_error: int | None = None  # an ErrorCode to refuse SetKVTarget with
    prefills: list[worker_pb2.PrefillRequest] = field(default_factory=list)
    targets: dict[str, worker_pb2.KVTarget] = field(default_factory=dict)  # given by SetKVTarget
    target_given: dict[str, asyncio.Event] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    connects: list[list[str]] = field(default_factory=list)  # the KV addresses of each Connect call

    async def Prefill(self, request, context):
        self.prefills.append(request)
        if self.error is not None:
            return worker_pb2.PrefillResponse(
                error=common_pb2.Error(code=self.error, message="transfer broke")
            )
        target = await self._target(request)
        return worker_pb2.PrefillResponse(result=self._result(request, target, kv_pending=False))

    async def PrefillStream(self, request, context):
        self.prefills.append(request)
        if self.error is not None:
            yield worker_pb2.PrefillResponse(error=common_pb2.Error(code=self.error, message="transfer broke"))
            return
        yield worker_pb2.PrefillResponse(result=self._result(request, None, kv_pending=True))
        target = await self._target(request)  # as a prefill worker, the KV waits for its target
        if self.kv_landed is not None:
            await self.kv_landed.wait()
        if self.error_after_first is not None:
            error = common_pb2.Error(code=self.error_after_first, message="transfer broke", retryable=True)
            yield worker_pb2.PrefillResponse(error=error)
            return
        yield worker_pb2.PrefillResponse(result=self._result(request, target, kv_pending=False))

    async def SetKVTarget(self, request, context):
        if self.target_error is not None:
            return worker_pb2.SetKVTargetResponse(
                error=common_pb2.Error(code=self.target_error, message="target refused")
            )
        self.targets[request.request_id] = request.kv_target
        self.target_given.setdefault(request.request_id, asyncio.Event()).set()
        return worker_pb2.SetKVTargetResponse(accepted=True)

    async def _target(self, request) -> worker_pb2.KVTarget:
        if not request.kv_target_follows:
            return request.kv_target
        await self.target_given.setdefault(request.request_id, asyncio.Event()).wait()
        return self.targets[request.request_id]

    @staticmethod
    def _result(request, target: worker_pb2.KVTarget | None, kv_pending: bool) -> worker_pb2.PrefillResult:
        result = worker_pb2.PrefillResult(
            first_token_id=TOKEN_BASE,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=16,
            num_transferred_blocks=0 if target is None else len(target.block_ids),
            kv_pending=kv_pending,
        )
        if request.sampling.logprobs:
            result.first_token_logprob.CopyFrom(common_pb2.TokenLogprob(token_id=TOKEN_BASE, logprob=-0.25))
        return result

    async def Abort(self, request, context):
        self.aborted.append(request.request_id)
        return worker_pb2.AbortResponse(found=False)

    async def GetInfo(self, request, context):
        return info(self.worker_id, common_pb2.WORKER_ROLE_PREFILL, self.address)

    async def Connect(self, request, context):
        self.connects.append(list(request.kv_transfer_addresses))
        if self.connect_status is not None:
            await context.abort(self.connect_status, "cannot open links now")
        return worker_pb2.ConnectResponse(opening=len(request.kv_transfer_addresses))

    async def GetKVEvents(self, request, context):
        return no_kv_events(request)


def no_kv_events(request: worker_pb2.KVEventsRequest) -> worker_pb2.KVEventsResponse:
    """The fakes cache nothing: no prefix-cache events, none lost."""
    return worker_pb2.KVEventsResponse(oldest_sequence=request.after_sequence + 1)


def info(worker_id: str, role: int, address: str, **kw) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=worker_id,
        role=role,
        address=address,
        model_fingerprint="fp",
        block_size=4,
        num_total_blocks=1000,
        num_free_blocks=900,
        model_name="m",
        max_model_len=4096,
        **kw,
    )


class WorkerServer:
    """One grpc.aio server on 127.0.0.1:<free port> hosting one fake worker."""

    def __init__(self, servicer: FakeDecode | FakePrefill) -> None:
        self.servicer = servicer
        self.server = grpc.aio.server()
        if isinstance(servicer, FakeDecode):
            worker_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, self.server)
        else:
            worker_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        servicer.address = self.address

    async def __aenter__(self) -> WorkerServer:
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(0)
