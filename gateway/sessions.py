"""Legacy-era session binding (which principal a `Mcp-Session-Id` belongs to), token sessions, revoked tokens.

Owns the store of all three, in memory or in Redis, so replicas share them.

A token session is one token the gateway issued (or first saw), by its `jti`:
who holds it, when it was issued, last used and expires, and whether it was
revoked. `mcp-gateway sessions list|revoke` and `/admin/sessions` read it.
 The first session id an upstream issues to a
principal (on the answer to `initialize`) is bound to that principal's
identity (issuer, subject, client). A request carrying a session id bound to
someone else is a hijack attempt; one carrying a session id the gateway never
bound (or whose binding expired or was ended) is answered 404, as the
specification answers an unknown session, so the client starts a new one.
DELETE and expiry end a binding.

    memory   cachetools TTLCache: one process (the default)
    redis    shared by every replica: `mcpgw:session:<id>` with a TTL, and a sorted
             set of expiries for counting the active ones; `mcpgw:token:<jti>` hashes
             and the `mcpgw:tokens` sorted set; `mcpgw:revoked:<jti>` until the token expires
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from cachetools import TLRUCache, TTLCache

if TYPE_CHECKING:
    from gateway.config import Sessions

Identity = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class TokenSession:
    """One token, by its id (`jti`)."""

    token_id: str
    subject: str
    client_id: str | None
    issuer: str
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float
    last_seen: float | None = None
    revoked: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SessionStore(Protocol):
    async def bind(self, session_id: str, identity: Identity) -> None: ...

    async def owner(self, session_id: str) -> Identity | None: ...

    async def end(self, session_id: str) -> None: ...

    async def active(self) -> int: ...

    async def revoke(self, token_id: str, until: float) -> None: ...

    async def revoked(self, token_id: str) -> bool: ...

    async def open_token(self, session: TokenSession) -> None:
        """Record a token as it is issued (never used yet)."""

    async def token_used(self, session: TokenSession) -> bool:
        """Record the token as last seen now (creating it if new); and whether it is revoked."""

    async def tokens(self) -> list[TokenSession]:
        """Every token session that has not expired, revoked ones included."""

    async def close(self) -> None: ...


class MemorySessions:
    def __init__(self, config: Sessions) -> None:
        self._bindings: TTLCache[str, Identity] = TTLCache(maxsize=config.max_sessions, ttl=config.ttl_s)
        self._revoked: dict[str, float] = {}  # token id -> its expiry (kept no longer than the token lives)
        self._tokens: TLRUCache[str, TokenSession] = TLRUCache(
            maxsize=config.max_sessions, ttu=lambda _k, v, _now: v.expires_at, timer=time.time)

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

    async def open_token(self, session: TokenSession) -> None:
        if session.expires_at > time.time():
            self._tokens[session.token_id] = session

    async def token_used(self, session: TokenSession) -> bool:
        if session.expires_at > time.time():
            known = self._tokens.get(session.token_id) or session
            self._tokens[session.token_id] = replace(known, last_seen=time.time())
        return await self.revoked(session.token_id)

    async def tokens(self) -> list[TokenSession]:
        self._tokens.expire()
        now = time.time()
        revoked = {k for k, until in self._revoked.items() if until > now}
        return [replace(s, revoked=s.token_id in revoked) for s in self._tokens.values()]

    async def close(self) -> None:
        return None


class RedisSessions:
    _PREFIX = "mcpgw:session:"
    _EXPIRIES = "mcpgw:sessions"
    _TOKEN = "mcpgw:token:"
    _TOKENS = "mcpgw:tokens"

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

    async def open_token(self, session: TokenSession) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._store_token(pipe, session)
            await pipe.execute()

    async def token_used(self, session: TokenSession) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(f"mcpgw:revoked:{session.token_id}")
            self._store_token(pipe, session, last_seen=time.time())
            revoked, *_ = await pipe.execute()
        return bool(revoked)

    def _store_token(self, pipe: Any, session: TokenSession, last_seen: float | None = None) -> None:
        """Queue the writes that record `session` (the token's own fields never change: rewriting them is safe)."""
        key = self._TOKEN + session.token_id
        fields = {k: orjson.dumps(v) for k, v in session.as_dict().items() if k not in ("last_seen", "revoked")}
        if last_seen is not None:
            fields["last_seen"] = orjson.dumps(last_seen)
        pipe.hset(key, mapping=fields)
        pipe.expireat(key, int(session.expires_at) + 1)
        pipe.zadd(self._TOKENS, {session.token_id: session.expires_at})

    async def tokens(self) -> list[TokenSession]:
        await self._redis.zremrangebyscore(self._TOKENS, "-inf", time.time())
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in await self._redis.zrange(self._TOKENS, 0, -1)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for token_id in ids:
                pipe.hgetall(self._TOKEN + token_id)
                pipe.exists(f"mcpgw:revoked:{token_id}")
            answers = await pipe.execute()
        found = []
        for raw, revoked in zip(answers[::2], answers[1::2], strict=True):
            if raw:
                fields = {k.decode(): orjson.loads(v) for k, v in raw.items()}
                fields["scopes"] = tuple(fields.get("scopes") or ())
                found.append(TokenSession(**fields, revoked=bool(revoked)))
        return found

    async def close(self) -> None:
        await self._redis.aclose()


def open_sessions(config: Sessions) -> SessionStore:
    return RedisSessions(config) if config.backend == "redis" else MemorySessions(config)
