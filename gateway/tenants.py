"""API keys at the gateway: each key maps to a tenant, which brings its own prefix-cache salt and
its limits in requests and tokens per minute, enforced across gateway replicas through Redis.

Keys come from a JSON file (``--api-keys-file``, a mounted Secret), never from argv:
``{"<api key>": {"tenant": "acme", "cache_salt": "acme", "requests_per_minute": 600,
"tokens_per_minute": 100000}}`` (0 or absent: unlimited). Clients send ``Authorization: Bearer
<key>`` (gRPC metadata ``authorization``, or the HTTP header). A missing or unknown key is
UNAUTHENTICATED (HTTP 401); a tenant over a limit RESOURCE_EXHAUSTED (HTTP 429).

Limits count in fixed one-minute windows: one Redis hash per tenant and minute (``requests``,
``tokens``), which every replica increments. A request is admitted while the window's requests
are within the limit and its tokens (prompt + completion, added when a generation ends) are below
it. When Redis fails the gateway admits (requests never fail because metadata is missing).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvmesh.requests import RequestError


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    cache_salt: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str) -> dict[str, Tenant]:
    """SHA-256 of each key -> its tenant (keys are not kept in memory in the clear)."""
    raw = json.loads(Path(path).read_text())
    keys = {}
    for key, entry in raw.items():
        name = entry["tenant"]
        keys[_digest(key)] = Tenant(
            name=name,
            cache_salt=entry.get("cache_salt", name),
            requests_per_minute=int(entry.get("requests_per_minute", 0)),
            tokens_per_minute=int(entry.get("tokens_per_minute", 0)),
        )
    return keys


def bearer(value: str | None) -> str:
    """The key of an ``Authorization: Bearer <key>`` value ("" when absent)."""
    scheme, _, key = (value or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


class Tenants:
    def __init__(self, keys: dict[str, Tenant], redis_url: str = "", deployment: str = "default") -> None:
        self.keys = keys
        self.prefix = f"kvmesh:{{tenants:{deployment}}}:"
        self._redis = None
        if redis_url:
            import redis.asyncio as aioredis

            from kvmesh.store.redis_keys import redis_auth

            self._redis = aioredis.Redis.from_url(
                redis_url,
                decode_responses=True,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                **redis_auth(),
            )
        self._local: dict[str, dict[str, int]] = {}  # without Redis: this gateway's own windows

    def authenticate(self, key: str) -> Tenant:
        tenant = self.keys.get(_digest(key)) if key else None
        if tenant is None:
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required (Authorization: Bearer)"
            )
        return tenant

    def _window(self, tenant: Tenant) -> str:
        return f"{self.prefix}{tenant.name}:{int(time.time() // 60)}"

    async def admit(self, tenant: Tenant) -> None:
        if not (tenant.requests_per_minute or tenant.tokens_per_minute):
            return
        key = self._window(tenant)
        counts = await self._add(key, "requests", 1)
        if counts is None:
            return  # Redis failed: admit
        requests, tokens = counts
        if tenant.requests_per_minute and requests > tenant.requests_per_minute:
            limit = f"{tenant.requests_per_minute} requests per minute"
        elif tenant.tokens_per_minute and tokens >= tenant.tokens_per_minute:
            limit = f"{tenant.tokens_per_minute} tokens per minute"
        else:
            return
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"tenant {tenant.name} is over its {limit}")

    async def spend(self, tenant: Tenant, tokens: int) -> None:
        if tenant.tokens_per_minute and tokens > 0:
            await self._add(self._window(tenant), "tokens", tokens)

    async def _add(self, key: str, field: str, n: int) -> tuple[int, int] | None:
        """Adds ``n`` to ``field`` of the window; returns its (requests, tokens) after."""
        if self._redis is None:
            window = self._local.setdefault(key, {"requests": 0, "tokens": 0})
            window[field] += n
            return window["requests"], window["tokens"]
        from redis.exceptions import RedisError

        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(key, field, n)
                pipe.hmget(key, "requests", "tokens")
                pipe.expire(key, 120)
                _, (requests, tokens), _ = await pipe.execute()
        except RedisError:
            return None
        return int(requests or 0), int(tokens or 0)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
