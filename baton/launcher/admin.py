"""Admin endpoints the launcher adds to the router app: cluster status and runtime scaling.

Both need ``Authorization: Bearer <token>`` (the shared-secret token of ``baton.grpc_auth``); the
launcher writes that token to a user-only file so ``baton status`` / ``baton scale`` on the same
machine find it.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from baton.grpc_auth import aio_channel, token_for
from baton.v1 import common_pb2, worker_pb2_grpc


def token_file(port: int) -> Path:
    base = Path(os.environ.get("BATON_CACHE_DIR") or Path.home() / ".cache" / "baton")
    return base / f"admin-{port}.token"


def write_token(port: int, secret: str) -> Path:
    path = token_file(port)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token_for(secret))
    return path


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}}, status)


async def worker_status(address: str, role: str, secret: str) -> dict:
    channel = aio_channel(address, secret)
    try:
        stub = (worker_pb2_grpc.PrefillServiceStub if role == "prefill" else worker_pb2_grpc.DecodeServiceStub)(channel)
        info = await stub.GetInfo(common_pb2.GetInfoRequest(), timeout=2.0)
    except Exception as e:
        return {"address": address, "role": role, "healthy": False, "error": str(e)}
    finally:
        await channel.close()
    st = info.stats
    return {
        "worker_id": info.worker_id, "role": role, "address": address, "healthy": True,
        "running": st.num_running, "waiting": st.num_waiting, "kv_cache_usage": round(st.kv_cache_usage, 4),
        "free_blocks": st.num_free_blocks, "total_blocks": st.num_total_blocks,
        "prefix_hit_rate": round(st.prefix_cache_hits / st.prefix_cache_queries, 4) if st.prefix_cache_queries else 0.0,
        "finished_requests": st.num_finished_requests, "generated_tokens": st.num_generated_tokens,
        "preemptions": st.num_preemptions,
    }


def add_admin_routes(app: FastAPI, controller, secret: str) -> None:
    expected = f"Bearer {token_for(secret)}"

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("authorization", ""), expected)

    @app.get("/admin/status", include_in_schema=False)
    async def status(request: Request):
        if not authorized(request):
            return _error(401, "admin endpoints need the cluster token (Authorization: Bearer ...)")
        members = [m for m in list(controller.members.values()) if m.info and not m.draining]
        rows = await asyncio.gather(*(worker_status(m.info["address"], m.spec.role, secret) for m in members))
        for row, m in zip(rows, members, strict=True):
            row.update(pid=m.info["pid"], incarnation=m.info["incarnation"], worker_id=m.spec.worker_id)
        return {"workers": sorted(rows, key=lambda r: (r["role"], r.get("worker_id", ""))), "counts": controller.counts()}

    @app.post("/admin/scale", include_in_schema=False)
    async def scale(request: Request):
        if not authorized(request):
            return _error(401, "admin endpoints need the cluster token (Authorization: Bearer ...)")
        try:
            body = await request.json()
            role, count = body["role"], int(body["count"])
            await asyncio.to_thread(controller.scale, role, count, 60.0, lambda _msg: None)
        except (KeyError, TypeError, ValueError) as e:
            return _error(400, f"expected {{'role': 'prefill'|'decode', 'count': N}}: {e}")
        return {"counts": controller.counts()}
