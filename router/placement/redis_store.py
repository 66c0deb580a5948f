"""Placement store in Redis, shared by every router replica.

Keys (``P`` is the key prefix, default ``{baton}``; the braces are a Redis Cluster hash tag so every
key lands in one slot and the Lua scripts below may touch several of them):

=========================  ======  =====================================================  ==========
key                        type    content                                                TTL
=========================  ======  =====================================================  ==========
``P:workers``              SET     ids of registered workers (may hold expired ids;        none
                                   ``live_workers`` prunes those whose hash is gone)
``P:worker:<id>``          HASH    the ``WorkerRecord`` fields as strings, plus            heartbeat
                                   ``kv_seq`` (last applied KV-event sequence)             ``ttl_s``
``P:blocks:<id>``          SET     raw 32-byte block hashes the worker caches              same as its
                                                                                           worker hash
=========================  ======  =====================================================  ==========

A worker is live exactly while ``P:worker:<id>`` exists. Every heartbeat and KV event re-arms the
block set's TTL to the worker hash's remaining TTL, so a dead worker's index disappears with it.
Multi-step updates (heartbeat, KV events, longest-prefix lookups) are Lua scripts: atomic, one round
trip each. Registration is one MULTI/EXEC pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from router.placement.base import KVEventBatch, WorkerRecord, WorkerRole

_INT_FIELDS = (
    "block_size",
    "num_total_blocks",
    "num_free_blocks",
    "num_running",
    "num_waiting",
    "max_model_len",
)
_STR_FIELDS = ("address", "model_fingerprint", "model_name", "kv_transfer_address")

# KEYS: worker hash, block set, workers set. ARGV: ttl_ms, worker id, then field/value pairs.
# Returns 1 when the worker was live before this heartbeat, else 0.
_HEARTBEAT_LUA = """
local existed = redis.call('EXISTS', KEYS[1])
if existed == 0 then redis.call('DEL', KEYS[2]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 3, #ARGV))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return existed
"""

# KEYS: worker hash, block set. ARGV: sequence, cleared (0/1), fingerprint ('' = unchecked),
# n_removed, removed hashes..., stored hashes...
# Returns 1 when applied, 0 when ignored.
_KV_EVENT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local fp = ARGV[3]
if fp ~= '' and redis.call('HGET', KEYS[1], 'model_fingerprint') ~= fp then return 0 end
local seq = tonumber(ARGV[1])
local last = redis.call('HGET', KEYS[1], 'kv_seq')
if last then
  last = tonumber(last)
  if seq <= last then return 0 end
  if seq > last + 1 then redis.call('DEL', KEYS[2]) end
end
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
redis.call('HSET', KEYS[1], 'kv_seq', ARGV[1])
-- unpack() is bounded by Lua's C stack, so large batches go in slices.
local function each_slice(cmd, from, to)
  local i = from
  while i <= to do
    local j = math.min(i + 999, to)
    redis.call(cmd, KEYS[2], unpack(ARGV, i, j))
    i = j + 1
  end
end
local first_stored = 5 + tonumber(ARGV[4])
each_slice('SREM', 5, first_stored - 1)
each_slice('SADD', first_stored, #ARGV)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# KEYS: block sets of the candidates. ARGV: the hash chain in order. Returns one count per key.
_LONGEST_PREFIX_LUA = """
local out = {}
for k = 1, #KEYS do
  local n = 0
  for i = 1, #ARGV do
    if redis.call('SISMEMBER', KEYS[k], ARGV[i]) == 0 then break end
    n = i
  end
  out[k] = n
end
return out
"""


class RedisPlacementStore:
    def __init__(self, client: aioredis.Redis, prefix: str = "{baton}") -> None:
        """``client`` must return bytes (``decode_responses=False``): block hashes are raw bytes."""
        self._redis = client
        self._prefix = prefix
        self._heartbeat = client.register_script(_HEARTBEAT_LUA)
        self._kv_event = client.register_script(_KV_EVENT_LUA)
        self._longest = client.register_script(_LONGEST_PREFIX_LUA)

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "{baton}", timeout_s: float = 2.0, password: str | None = None
    ) -> RedisPlacementStore:
        """Every command has a deadline (``timeout_s``); a password given here overrides the URL's."""
        kwargs = {"password": password} if password else {}
        client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **kwargs
        )
        return cls(client, prefix)

    def _workers_key(self) -> str:
        return f"{self._prefix}:workers"

    def _worker_key(self, worker_id: str) -> str:
        return f"{self._prefix}:worker:{worker_id}"

    def _blocks_key(self, worker_id: str) -> str:
        return f"{self._prefix}:blocks:{worker_id}"

    async def register(self, worker: WorkerRecord, ttl_s: float) -> None:
        ttl_ms = _ttl_ms(ttl_s)
        wkey = self._worker_key(worker.worker_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(wkey, self._blocks_key(worker.worker_id))
            pipe.hset(wkey, mapping=_to_fields(worker))
            pipe.pexpire(wkey, ttl_ms)
            pipe.sadd(self._workers_key(), worker.worker_id)
            await pipe.execute()

    async def heartbeat(self, worker: WorkerRecord, ttl_s: float) -> bool:
        flat: list[str | int] = [_ttl_ms(ttl_s), worker.worker_id]
        for key, value in _to_fields(worker).items():
            flat += [key, value]
        keys = [self._worker_key(worker.worker_id), self._blocks_key(worker.worker_id), self._workers_key()]
        existed = await self._heartbeat(keys=keys, args=flat)
        return bool(existed)

    async def deregister(self, worker_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._worker_key(worker_id), self._blocks_key(worker_id))
            pipe.srem(self._workers_key(), worker_id)
            await pipe.execute()

    async def live_workers(self) -> list[WorkerRecord]:
        ids = sorted(m.decode() for m in await self._redis.smembers(self._workers_key()))
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(self._worker_key(worker_id))
            hashes = await pipe.execute()
        live, gone = [], []
        for worker_id, fields in zip(ids, hashes, strict=True):
            if fields:
                live.append(_from_fields(worker_id, fields))
            else:
                gone.append(worker_id)
        if gone:
            await self._redis.srem(self._workers_key(), *gone)
        return live

    async def apply_kv_event(self, event: KVEventBatch) -> bool:
        args: list[str | int | bytes] = [
            event.sequence,
            1 if event.all_blocks_cleared else 0,
            event.model_fingerprint,
            len(event.removed_block_hashes),
            *event.removed_block_hashes,
            *event.stored_block_hashes,
        ]
        keys = [self._worker_key(event.worker_id), self._blocks_key(event.worker_id)]
        return bool(await self._kv_event(keys=keys, args=args))

    async def longest_prefix(
        self, block_hashes: Sequence[bytes], candidates: Sequence[str]
    ) -> dict[str, int]:
        if not candidates:
            return {}
        if not block_hashes:
            return dict.fromkeys(candidates, 0)
        keys = [self._blocks_key(w) for w in candidates]
        counts = await self._longest(keys=keys, args=list(block_hashes))
        return {w: int(n) for w, n in zip(candidates, counts, strict=True)}

    async def close(self) -> None:
        await self._redis.aclose()


def _ttl_ms(ttl_s: float) -> int:
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    return max(1, round(ttl_s * 1000))


def _to_fields(worker: WorkerRecord) -> dict[str, str]:
    fields = {name: str(getattr(worker, name)) for name in (*_INT_FIELDS, *_STR_FIELDS)}
    fields["role"] = worker.role.value
    return fields


def _from_fields(worker_id: str, raw: dict[bytes, bytes]) -> WorkerRecord:
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    return WorkerRecord(
        worker_id=worker_id,
        role=WorkerRole(fields["role"]),
        **{name: int(fields[name]) for name in _INT_FIELDS},
        **{name: fields[name] for name in _STR_FIELDS},
    )
