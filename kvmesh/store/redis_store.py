"""Redis metadata store: shared by every gateway replica, the workers' reporters and the operator.

Key names and authentication: ``kvmesh.store.redis_keys``. A routing decision reads everything it
needs with one ``EVALSHA`` (``LOOKUP``). Scripts build worker and block keys from the tagged prefix
they are given; every key shares the slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvmesh.store.base import BLOCK_TTL_S, ROUTE_TTL_S, WORKER_TTL_S, RoutingView, StoreError, WorkerInfo
from kvmesh.store.redis_keys import RedisKeys, hex64, redis_auth

CHUNK = 4096  # hashes per script call, keeps single script runs short

# KEYS[1] workers set, KEYS[2..] block keys in prompt order. ARGV[1] worker key prefix.
# Returns {matches, worker, worker, ...}: matches is "id\tdepth\tid\tdepth..."; each worker its
# hash fields as "field\tvalue\t...". Few, flat strings: parsing RESP in Python costs per element.
LOOKUP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local workers, live = {}, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HGETALL', ARGV[1] .. id)
  if #h == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    workers[#workers + 1] = table.concat(h, '\t')
    live[id] = true
  end
end
local depth, alive = {}, live
for i = 2, #KEYS do
  local f = redis.call('HGETALL', KEYS[i])
  local nxt, any = {}, false
  for j = 1, #f, 2 do
    local w, v = f[j], f[j + 1]
    if alive[w] and (v == 'p' or tonumber(v) > now) then
      nxt[w] = true
      any = true
      depth[w] = i - 1
    end
  end
  if not any then break end
  alive = nxt
end
local flat = {}
for w, d in pairs(depth) do
  flat[#flat + 1] = w
  flat[#flat + 1] = d
end
table.insert(workers, 1, table.concat(flat, '\t'))
return workers
"""

# KEYS[1] the worker's blocks set. ARGV: worker_id, block key prefix, snapshot (0|1), ttl_s,
# n_stored, stored hashes..., removed hashes...
APPLY_BLOCKS = """
local wid, pfx, ttl, ns = ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])
if ARGV[3] == '1' then
  for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    redis.call('HDEL', pfx .. h, wid)
  end
  redis.call('DEL', KEYS[1])
end
for i = 6, 5 + ns do
  local k = pfx .. ARGV[i]
  redis.call('HSET', k, wid, 'p')
  redis.call('EXPIRE', k, ttl)
  redis.call('SADD', KEYS[1], ARGV[i])
end
for i = 6 + ns, #ARGV do
  redis.call('HDEL', pfx .. ARGV[i], wid)
  redis.call('SREM', KEYS[1], ARGV[i])
end
if ns > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""

# ARGV: worker_id, block key prefix, ttl_ms, hashes... Never downgrades a precise entry.
RECORD_ROUTE = """
local t = redis.call('TIME')
local ttl_ms = tonumber(ARGV[3])
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl_ms
local ttl_s = math.ceil(ttl_ms / 1000)
for i = 4, #ARGV do
  local k = ARGV[2] .. ARGV[i]
  if redis.call('HGET', k, ARGV[1]) ~= 'p' then
    redis.call('HSET', k, ARGV[1], expiry)
    if redis.call('TTL', k) < ttl_s then redis.call('EXPIRE', k, ttl_s) end
  end
end
return 1
"""


class RedisStore:
    """``MetadataStore`` over Redis. Every method raises ``StoreError`` when Redis fails."""

    def __init__(
        self,
        url: str,
        deployment: str,
        max_lookup_blocks: int = 512,
        socket_timeout_s: float = 0.5,
    ) -> None:
        self.keys = RedisKeys(deployment)
        self.max_lookup_blocks = max_lookup_blocks
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry_on_timeout=False,
            **redis_auth(),
        )
        self._lookup = self._redis.register_script(LOOKUP)
        self._apply = self._redis.register_script(APPLY_BLOCKS)
        self._route = self._redis.register_script(RECORD_ROUTE)

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as e:
            raise store_error(e) from e

    async def upsert_worker(self, info: WorkerInfo, ttl_s: float = WORKER_TTL_S) -> bool:
        key = self.keys.worker(info.worker_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(key)
                pipe.hset(key, mapping=info.to_fields())
                pipe.pexpire(key, int(ttl_s * 1000))
                pipe.sadd(self.keys.workers, info.worker_id)
                existed, *_ = await pipe.execute()
        except RedisError as e:
            raise store_error(e) from e
        return bool(existed)

    async def remove_worker(self, worker_id: str) -> None:
        try:
            await self.apply_blocks(worker_id, [], [], snapshot=True)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.srem(self.keys.workers, worker_id)
                pipe.delete(self.keys.worker(worker_id))
                await pipe.execute()
        except RedisError as e:
            raise store_error(e) from e

    async def apply_blocks(
        self, worker_id: str, stored: Sequence[int], removed: Sequence[int], snapshot: bool = False
    ) -> None:
        blocks_key = self.keys.worker_blocks(worker_id)
        head = [worker_id, self.keys.block_prefix]
        first = True
        try:
            # The first chunk carries the snapshot reset; later chunks only add or remove.
            for start in range(0, max(len(stored), 1), CHUNK):
                part = [hex64(h) for h in stored[start : start + CHUNK]]
                reset = "1" if (snapshot and first) else "0"
                await self._apply(keys=[blocks_key], args=[*head, reset, int(BLOCK_TTL_S), len(part), *part])
                first = False
            for start in range(0, len(removed), CHUNK):
                part = [hex64(h) for h in removed[start : start + CHUNK]]
                await self._apply(keys=[blocks_key], args=[*head, "0", int(BLOCK_TTL_S), 0, *part])
        except RedisError as e:
            raise store_error(e) from e

    async def record_route(self, worker_id: str, hashes: Sequence[int], ttl_s: float = ROUTE_TTL_S) -> None:
        if not hashes:
            return
        args = [worker_id, self.keys.block_prefix, int(ttl_s * 1000)]
        args += [hex64(h) for h in hashes[: self.max_lookup_blocks]]
        try:
            await self._route(keys=[self.keys.workers], args=args)
        except RedisError as e:
            raise store_error(e) from e

    async def lookup(self, hashes: Sequence[int]) -> RoutingView:
        keys = [self.keys.workers] + [self.keys.block(h) for h in hashes[: self.max_lookup_blocks]]
        try:
            matches_raw, *workers_raw = await self._lookup(keys=keys, args=[self.keys.worker_prefix])
        except RedisError as e:
            raise store_error(e) from e
        workers = [WorkerInfo.from_fields(_pairs(raw.split("\t"))) for raw in workers_raw]
        workers.sort(key=lambda w: w.worker_id)
        flat = matches_raw.split("\t") if matches_raw else []
        matches = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return RoutingView(workers=workers, matches=matches)

    async def list_workers(self) -> list[WorkerInfo]:
        return (await self.lookup([])).workers

    async def routing(self) -> dict[str, str]:
        """The deployment's published routing settings (``policy``, ``load_factor``); {} if none."""
        try:
            return await self._redis.hgetall(self.keys.routing)
        except RedisError as e:
            raise store_error(e) from e

    async def close(self) -> None:
        await self._redis.aclose()


def store_error(e: RedisError) -> StoreError:
    """A ``StoreError`` whose message leads with the cause a person acts on: authentication, DNS,
    refused connection, TLS or timeout (redis-py's own text follows; it never holds the password)."""
    text = str(e)
    low = text.lower()
    if isinstance(e, AuthenticationError) or "noauth" in low or "wrongpass" in low:
        cause = "authentication failed (wrong or missing password)"
    elif isinstance(e, RedisTimeoutError):
        cause = "timed out"
    elif isinstance(e, RedisConnectionError):
        if "certificate" in low or "ssl" in low:
            cause = "TLS handshake failed"
        elif any(m in low for m in ("name or service not known", "name resolution", "nodename nor servname")):
            cause = "DNS lookup failed"
        elif "refused" in low or "connect call failed" in low:
            cause = "connection refused"
        else:
            cause = "connection failed"
    else:
        cause = "Redis error"
    return StoreError(f"{cause}: {text}")


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
