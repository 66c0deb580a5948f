"""Start real worker processes (gloo, loopback gRPC) for tests and tear them down."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc

from baton.grpc_auth import auth_metadata
from baton.v1 import common_pb2, worker_pb2_grpc

SECRET = "test-secret-for-workers"


class WorkerProcess:
    def __init__(self, role: str, model: str, *extra: str) -> None:
        env = dict(os.environ, BATON_SECRET=SECRET, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        module = "prefill_worker" if role == "prefill" else "decode_worker"
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--model", model, "--worker-id", f"{role}-t", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.address = self._wait_ready()

    def _wait_ready(self, timeout: float = 180.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("READY "):
                return line.split()[1]
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} worker exited: {self.proc.stderr.read()[-3000:]}")
        raise TimeoutError(f"{self.role} worker did not start")

    def info(self) -> common_pb2.WorkerInfo:
        ch = grpc.insecure_channel(self.address)
        stub = (worker_pb2_grpc.PrefillServiceStub if self.role == "prefill" else worker_pb2_grpc.DecodeServiceStub)(ch)
        return stub.GetInfo(common_pb2.GetInfoRequest(), metadata=auth_metadata(SECRET), timeout=10)

    def wait_idle_and_clean(self, timeout: float = 20.0) -> common_pb2.WorkerInfo:
        """Every block free or cached again (no leak), polled until ``timeout``."""
        deadline = time.time() + timeout
        while True:
            info = self.info()
            if info.num_free_blocks == info.num_total_blocks and info.num_running == 0:
                return info
            if time.time() > deadline:
                raise AssertionError(f"{self.role}: {info.num_free_blocks}/{info.num_total_blocks} blocks free, {info.num_running} running")
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
