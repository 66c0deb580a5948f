"""A minimal P -> D driver without the router: Reserve on D, Prefill on P into D's blocks, Decode on D.

Used by tests and for poking at a pair of workers by hand::

    python -m baton.pd_driver --prefill 127.0.0.1:50061 --decode 127.0.0.1:50062 --tokens 1,2,3
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import grpc

from baton.grpc_auth import auth_metadata
from baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc


@dataclass
class DriveResult:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: int | None = None
    error: common_pb2.Error | None = None
    num_cached_tokens_prefill: int = 0
    num_transferred_blocks: int = 0
    first_token_before_kv: bool = False  # streamed: P answered the first token before the KV landed


class PDDriver:
    def __init__(self, prefill_address: str | None, decode_address: str, secret: str, timeout_s: float = 60.0) -> None:
        self.md = auth_metadata(secret)
        self.timeout_s = timeout_s
        self.decode = worker_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(decode_address))
        self.prefill = worker_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(prefill_address)) if prefill_address else None

    def run(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: common_pb2.SamplingParams,
        local_prefill: bool = False,
        stream: bool = False,
        target_follows: bool = False,
    ) -> DriveResult:
        """One request through D's Reserve, P's Prefill (``stream``: PrefillStream) and D's Decode.

        ``target_follows``: as the router does, P's PrefillStream starts first (``kv_target_follows``)
        and D's Reserve runs beside it; the target then goes to P by SetKVTarget."""
        out = DriveResult()
        deadline_ms = int((time.time() + self.timeout_s) * 1000)
        split = not local_prefill and self.prefill is not None
        started = None  # P's PrefillStream, already computing, when the target follows
        if split and target_follows:
            started = self.prefill.PrefillStream(
                worker_pb2.PrefillRequest(
                    request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling,
                    deadline_ms=deadline_ms, kv_target_follows=True,
                ),
                metadata=self.md, timeout=self.timeout_s,
            )  # fmt: skip
        reserved = self.decode.Reserve(
            worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling, deadline_ms=deadline_ms),
            metadata=self.md, timeout=self.timeout_s,
        )
        if reserved.HasField("error"):
            if started is not None:
                started.cancel()  # P drops the request when its caller leaves
            out.error = reserved.error
            return out
        decode_req = worker_pb2.DecodeRequest(request_id=request_id, deadline_ms=deadline_ms)
        if not split:
            decode_req.local_prefill = True
        else:
            if started is None:
                pre = self._prefill(request_id, prompt_ids, sampling, reserved.handle, deadline_ms, stream, out)
            else:
                pre = self._target_follows(started, request_id, reserved.handle, out)
            if pre.HasField("error"):
                self.decode.Abort(worker_pb2.AbortRequest(request_id=request_id, reason="prefill failed"), metadata=self.md, timeout=5)
                out.error = pre.error
                return out
            out.token_ids.append(pre.result.first_token_id)
            out.num_cached_tokens_prefill = pre.result.num_cached_tokens
            out.num_transferred_blocks = pre.result.num_transferred_blocks
            decode_req.first_token_id = pre.result.first_token_id
            if pre.result.HasField("first_token_logprob"):
                decode_req.first_token_logprob.CopyFrom(pre.result.first_token_logprob)
                decode_req.first_token_top_logprobs.CopyFrom(pre.result.first_token_top_logprobs)
        for msg in self.decode.Decode(decode_req, metadata=self.md, timeout=self.timeout_s):
            if msg.HasField("error"):
                out.error = msg.error
                break
            out.token_ids.extend(msg.chunk.token_ids)
            if msg.chunk.HasField("finish_reason"):
                out.finish_reason = msg.chunk.finish_reason
                break
        return out

    def _prefill(self, request_id, prompt_ids, sampling, target, deadline_ms, stream: bool, out: DriveResult) -> worker_pb2.PrefillResponse:
        """P's final answer (KV delivered, or the error); streamed, the first answer is checked too."""
        req = worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling, kv_target=target, deadline_ms=deadline_ms)
        if not stream:
            return self.prefill.Prefill(req, metadata=self.md, timeout=self.timeout_s)
        return self._last_answer(list(self.prefill.PrefillStream(req, metadata=self.md, timeout=self.timeout_s)), out)

    def _target_follows(self, started, request_id: str, target: worker_pb2.KVTarget, out: DriveResult) -> worker_pb2.PrefillResponse:
        """Hand D's target to the PrefillStream already running on P; P's final answer (or the error)."""
        given = self.prefill.SetKVTarget(
            worker_pb2.SetKVTargetRequest(request_id=request_id, kv_target=target), metadata=self.md, timeout=self.timeout_s
        )
        if given.HasField("error"):
            started.cancel()
            return worker_pb2.PrefillResponse(error=given.error)
        return self._last_answer(list(started), out)

    @staticmethod
    def _last_answer(answers: list[worker_pb2.PrefillResponse], out: DriveResult) -> worker_pb2.PrefillResponse:
        """PrefillStream's last answer, once its order is checked (first token before the KV landed)."""
        first, last = answers[0], answers[-1]
        if first.HasField("result"):
            out.first_token_before_kv = first.result.kv_pending
            if len(answers) != 2 or (last.HasField("result") and (last.result.kv_pending or last.result.first_token_id != first.result.first_token_id)):
                raise RuntimeError(f"PrefillStream answered out of order: {answers}")
        return last


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(prog="python -m baton.pd_driver")
    p.add_argument("--prefill", default=None)
    p.add_argument("--decode", required=True)
    p.add_argument("--tokens", required=True, help="comma-separated prompt token ids")
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    driver = PDDriver(args.prefill, args.decode, os.environ.get("BATON_SECRET", ""))
    sp = common_pb2.SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    res = driver.run("driver-0", [int(t) for t in args.tokens.split(",")], sp)
    print(res)
    return 1 if res.error else 0


if __name__ == "__main__":
    raise SystemExit(main())
