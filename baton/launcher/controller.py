"""ClusterController: keeps the desired number of prefill and decode actors alive on Ray.

Ray restarts a dead actor (``max_restarts=-1``); the controller notices the new incarnation (a new
process, new addresses, an empty cache), re-registers it in the placement store as a fresh worker,
and keeps the router's list of workers to poll current. Scaling down drains first: the worker leaves
routing at once, finishes what it holds (bounded wait), then its actor is killed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import ray

from baton.launcher.actors import WorkerActor, WorkerSpec

log = logging.getLogger("baton.launcher")


@dataclass
class Member:
    spec: WorkerSpec
    actor: object  # ray ActorHandle
    info: dict | None = None  # last ready() answer
    draining: bool = False


class ClusterController:
    def __init__(self, base: WorkerSpec, num_gpus_per_worker: float, role_resources: bool = False, num_cpus_per_worker: float = 1.0) -> None:
        self.base = base
        self.num_gpus = num_gpus_per_worker
        self.num_cpus = num_cpus_per_worker
        self.role_resources = role_resources
        self.members: dict[str, Member] = {}
        self._next_index = {"prefill": 0, "decode": 0}
        self.on_new_incarnation: Callable[[dict], None] | None = None
        self.on_removed: Callable[[str], None] | None = None

    # --- membership --------------------------------------------------------------------------
    def _spawn(self, role: str) -> Member:
        idx = self._next_index[role]
        self._next_index[role] += 1
        spec = replace(self.base, role=role, worker_id=f"{role}-{idx}")
        options = dict(num_gpus=self.num_gpus, num_cpus=self.num_cpus, max_restarts=-1, max_task_retries=0, name=f"baton-{spec.worker_id}-{int(time.time())}")
        if self.role_resources:
            options["resources"] = {f"baton_{role}": 1}
        actor = ray.remote(WorkerActor).options(**options).remote(spec)
        member = Member(spec, actor)
        self.members[spec.worker_id] = member
        return member

    def start(self, num_prefill: int, num_decode: int, timeout_s: float = 600.0, progress: Callable[[str], None] = print) -> None:
        for _ in range(num_decode):
            self._spawn("decode")
        for _ in range(num_prefill):
            self._spawn("prefill")
        self.wait_ready(list(self.members.values()), timeout_s, progress)

    def wait_ready(self, members: list[Member], timeout_s: float, progress: Callable[[str], None] = print) -> None:
        pending = {m.actor.ready.remote(): m for m in members}
        deadline = time.time() + timeout_s
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.time()))
            if not done:
                raise TimeoutError(f"workers not ready after {timeout_s:.0f} s: {[m.spec.worker_id for m in pending.values()]}")
            member = pending.pop(done[0])
            member.info = ray.get(done[0])  # raises the actor's startup error, if any
            progress(f"  {member.spec.worker_id} ready at {member.info['address']}")
            if self.on_new_incarnation:
                self.on_new_incarnation(member.info)

    def targets(self) -> list[tuple[str, str]]:
        """(grpc address, role) of every live, non-draining worker (what the router polls)."""
        return [(m.info["address"], m.spec.role) for m in self.members.values() if m.info and not m.draining]

    def counts(self) -> dict[str, int]:
        out = {"prefill": 0, "decode": 0}
        for m in self.members.values():
            if not m.draining:
                out[m.spec.role] += 1
        return out

    # --- health ------------------------------------------------------------------------------
    def check(self, timeout_s: float = 2.0) -> list[str]:
        """Ping every member; pick up restarted incarnations. Returns ids that are down right now."""
        down = []
        refs = {m.actor.ping.remote(): m for m in self.members.values()}
        for ref, m in refs.items():
            try:
                incarnation = ray.get(ref, timeout=timeout_s)
            except Exception:
                down.append(m.spec.worker_id)
                continue
            if m.info is None or incarnation != m.info["incarnation"]:
                try:
                    m.info = ray.get(m.actor.ready.remote(), timeout=timeout_s)
                except Exception:
                    down.append(m.spec.worker_id)
                    continue
                log.warning("%s restarted (incarnation %s) at %s", m.spec.worker_id, incarnation, m.info["address"])
                if self.on_new_incarnation:
                    self.on_new_incarnation(m.info)
        return down

    # --- scaling -----------------------------------------------------------------------------
    def scale(self, role: str, n: int, drain_timeout_s: float = 60.0, progress: Callable[[str], None] = print) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {role!r}")
        if role == "decode" and n < 1:
            raise ValueError("at least one decode worker is needed")
        if n < 0:
            raise ValueError("count must be >= 0")
        current = [m for m in self.members.values() if m.spec.role == role and not m.draining]
        if n > len(current):
            new = [self._spawn(role) for _ in range(n - len(current))]
            self.wait_ready(new, 600.0, progress)
        for m in sorted(current, key=lambda m: m.spec.worker_id, reverse=True)[: max(0, len(current) - n)]:
            self._remove(m, drain_timeout_s, progress)

    def _remove(self, m: Member, drain_timeout_s: float, progress: Callable[[str], None]) -> None:
        m.draining = True
        if self.on_removed:
            self.on_removed(m.spec.worker_id)  # out of routing first
        deadline = time.time() + drain_timeout_s
        while time.time() < deadline:
            try:
                left = ray.get(m.actor.drain.remote(), timeout=5)
            except Exception:
                break
            if left["running"] == 0 and left["waiting"] == 0 and left["pending"] == 0:
                break
            time.sleep(0.2)
        try:
            ray.get(m.actor.stop.remote(), timeout=10)
        except Exception:
            pass
        ray.kill(m.actor, no_restart=True)
        self.members.pop(m.spec.worker_id, None)
        progress(f"  {m.spec.worker_id} drained and removed")

    def shutdown(self) -> None:
        for m in list(self.members.values()):
            try:
                ray.get(m.actor.stop.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(m.actor, no_restart=True)
        self.members.clear()
