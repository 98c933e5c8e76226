"""Legacy-era session binding (which principal a `Mcp-Session-Id` belongs to) and revoked tokens.

Owns the store of both, in memory or in Redis, so replicas share them. The first session id an upstream issues to a
principal (on the answer to `initialize`) is bound to that principal's
identity (issuer, subject, client). A request carrying a session id bound to
someone else is a hijack attempt; one carrying a session id the gateway never
bound (or whose binding expired or was ended) is answered 404, as the
specification answers an unknown session, so the client starts a new one.
DELETE and expiry end a binding.

    memory   cachetools TTLCache: one process (the default)
    redis    shared by every replica: `mcpgw:session:<id>` with a TTL, and a sorted
             set of expiries for counting the active ones
"""

from __future__ import annotations

import time
from typing import Protocol

import orjson
from cachetools import TTLCache

from gateway.config import Sessions

Identity = tuple[str, str, str]


class SessionStore(Protocol):
    async def bind(self, session_id: str, identity: Identity) -> None: ...

    async def owner(self, session_id: str) -> Identity | None: ...

    async def end(self, session_id: str) -> None: ...

    async def active(self) -> int: ...

    async def revoke(self, token_id: str, until: float) -> None: ...

    async def revoked(self, token_id: str) -> bool: ...

    async def close(self) -> None: ...


class MemorySessions:
    def __init__(self, config: Sessions) -> None:
        self._bindings: TTLCache[str, Identity] = TTLCache(maxsize=config.max_sessions, ttl=config.ttl_s)
        self._revoked: dict[str, float] = {}  # token id -> its expiry (kept no longer than the token lives)

    async def bind(self, session_id: str, identity: Identity) -> None:
        self._bindings[session_id] = identity

    async def owner(self, session_id: str) -> Identity | None:
        identity = self._bindings.get(session_id)
        if identity is not None:
            self._bindings[session_id] = identity  # in use: the binding lives on
        return identity

    async def end(self, session_id: str) -> None:
        self._bindings.pop(session_id, None)

    async def active(self) -> int:
        self._bindings.expire()
        return len(self._bindings)

    async def revoke(self, token_id: str, until: float) -> None:
        now = time.time()
        self._revoked = {k: v for k, v in self._revoked.items() if v > now}
        self._revoked[token_id] = until

    async def revoked(self, token_id: str) -> bool:
        until = self._revoked.get(token_id)
        return until is not None and until > time.time()

    async def close(self) -> None:
        return None


class RedisSessions:
    _PREFIX = "mcpgw:session:"
    _EXPIRIES = "mcpgw:sessions"

    def __init__(self, config: Sessions) -> None:
        import redis.asyncio

        assert config.url is not None
        self._redis = redis.asyncio.from_url(config.url, socket_timeout=2, socket_connect_timeout=2)
        self._ttl = int(config.ttl_s)

    async def bind(self, session_id: str, identity: Identity) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._PREFIX + session_id, orjson.dumps(identity), ex=self._ttl)
            pipe.zadd(self._EXPIRIES, {session_id: time.time() + self._ttl})
            await pipe.execute()

    async def owner(self, session_id: str) -> Identity | None:
        key = self._PREFIX + session_id
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(key)
            pipe.expire(key, self._ttl)  # in use: the binding lives on
            pipe.zadd(self._EXPIRIES, {session_id: time.time() + self._ttl}, xx=True)
            raw, _, _ = await pipe.execute()
        if raw is None:
            return None
        issuer, subject, client = orjson.loads(raw)
        return (str(issuer), str(subject), str(client))

    async def end(self, session_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._PREFIX + session_id)
            pipe.zrem(self._EXPIRIES, session_id)
            await pipe.execute()

    async def active(self) -> int:
        now = time.time()
        await self._redis.zremrangebyscore(self._EXPIRIES, "-inf", now)
        return int(await self._redis.zcard(self._EXPIRIES))

    async def revoke(self, token_id: str, until: float) -> None:
        ttl = max(1, int(until - time.time()) + 1)
        await self._redis.set(f"mcpgw:revoked:{token_id}", b"1", ex=ttl)

    async def revoked(self, token_id: str) -> bool:
        return bool(await self._redis.exists(f"mcpgw:revoked:{token_id}"))

    async def close(self) -> None:
        await self._redis.aclose()


def open_sessions(config: Sessions) -> SessionStore:
    return RedisSessions(config) if config.backend == "redis" else MemorySessions(config)
