"""State handles bound to the principal they belong to: legacy sessions, tasks, server requests awaiting an
answer; token sessions and revoked tokens; and one-time claims (a TOTP code used once across replicas).

Owns the store of all of them, in memory or in Redis, so replicas share them.
A handle is never authentication: each names the principal (issuer, subject,
client) it belongs to, and the gateway refuses it to anyone else.

- A task (a `taskId` an upstream returned on a call) belongs to the principal
  whose call created it, for the task's time to live.
- A server->client request the gateway passed on (sampling, elicitation,
  roots, ping on a legacy stream) awaits an answer from the principal it was
  passed to; the answer is taken once.

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

    memory   cachetools caches: one process (the default; `serve --workers` needs redis)
    redis    shared by every replica: `mcpgw:session:<id>` with a TTL, and a sorted
             set of expiries for counting the active ones; `mcpgw:token:<jti>` hashes
             and the `mcpgw:tokens` sorted set; `mcpgw:revoked:<jti>` until the token expires;
             `mcpgw:task:<upstream>:<task id>` and `mcpgw:pending:<key>` with their TTLs;
             `mcpgw:once:<key>`, set only if absent (SET NX), for the claim's TTL

A store that cannot be reached raises `StateUnavailable` (a 503 for the
request): a session, task or revocation that cannot be checked is refused,
never assumed. The Redis client reconnects by itself once the server is back.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

import orjson
from cachetools import TLRUCache, TTLCache

from gateway.errors import StateUnavailable

if TYPE_CHECKING:
    from gateway.config import Sessions

Identity = tuple[str, str, str]
_MAX_HANDLE_TTL_S = 7 * 86400  # the longest a task or an awaited answer is remembered


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

    async def own_task(self, upstream: str, task_id: str, identity: Identity, ttl_s: float) -> None:
        """Record that `identity`'s call created task `task_id` at `upstream`."""

    async def owned_tasks(self, upstream: str, identity: Identity, task_ids: Iterable[str]) -> set[str]:
        """Those of `task_ids` that belong to `identity`."""

    async def expect_answer(self, key: str, identity: Identity, kind: str, ttl_s: float) -> None:
        """Record a server->client request (by `key`) passed on to `identity`, of `kind`."""

    async def take_answer(self, key: str) -> tuple[Identity, str] | None:
        """The principal and kind of the awaited request `key`, forgotten as it is taken; None if none."""

    async def claim_once(self, key: str, ttl_s: float) -> bool:
        """Claim `key` for `ttl_s` seconds: True for the first claim, False while it stands (whoever made it)."""

    async def tally(self, key: str, window_s: float, add: int = 1) -> int:
        """Add `add` to the count of `key` and return it; a count starts at its first addition and lasts
        `window_s` (a fixed window, shared by replicas)."""

    async def ping(self) -> bool:
        """Whether the store answers."""

    async def close(self) -> None: ...


class MemorySessions:
    def __init__(self, config: Sessions) -> None:
        self._bindings: TTLCache[str, Identity] = TTLCache(maxsize=config.max_sessions, ttl=config.ttl_s)
        self._revoked: dict[str, float] = {}  # token id -> its expiry (kept no longer than the token lives)
        self._tokens: TLRUCache[str, TokenSession] = TLRUCache(
            maxsize=config.max_sessions, ttu=lambda _k, v, _now: v.expires_at, timer=time.time)
        # Handles with their own expiry: (value, until)
        self._tasks: TLRUCache[tuple[str, str], tuple[Identity, float]] = TLRUCache(
            maxsize=config.max_sessions, ttu=lambda _k, v, _now: v[1], timer=time.time)
        self._awaited: TLRUCache[str, tuple[tuple[Identity, str], float]] = TLRUCache(
            maxsize=config.max_sessions, ttu=lambda _k, v, _now: v[1], timer=time.time)
        self._claimed: TLRUCache[str, float] = TLRUCache(  # key -> until
            maxsize=config.max_sessions, ttu=lambda _k, v, _now: v, timer=time.time)
        self._tallies: TLRUCache[str, tuple[int, float]] = TLRUCache(  # key -> (count, until)
            maxsize=config.max_sessions, ttu=lambda _k, v, _now: v[1], timer=time.time)

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

    async def own_task(self, upstream: str, task_id: str, identity: Identity, ttl_s: float) -> None:
        self._tasks[(upstream, task_id)] = (identity, time.time() + min(ttl_s, _MAX_HANDLE_TTL_S))

    async def owned_tasks(self, upstream: str, identity: Identity, task_ids: Iterable[str]) -> set[str]:
        return {t for t in task_ids if (self._tasks.get((upstream, t)) or (None,))[0] == identity}

    async def expect_answer(self, key: str, identity: Identity, kind: str, ttl_s: float) -> None:
        self._awaited[key] = ((identity, kind), time.time() + min(ttl_s, _MAX_HANDLE_TTL_S))

    async def take_answer(self, key: str) -> tuple[Identity, str] | None:
        found = self._awaited.pop(key, None)
        return None if found is None else found[0]

    async def claim_once(self, key: str, ttl_s: float) -> bool:
        if key in self._claimed:  # no await between the test and the claim: one event loop claims it once
            return False
        self._claimed[key] = time.time() + ttl_s
        return True

    async def tally(self, key: str, window_s: float, add: int = 1) -> int:
        count, until = self._tallies.get(key, (0, time.time() + window_s))
        self._tallies[key] = (count + add, until)
        return count + add

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


_P = ParamSpec("_P")
_T = TypeVar("_T")
_S = TypeVar("_S")


def reached(method: Callable[Concatenate[_S, _P], Coroutine[Any, Any, _T]]
            ) -> Callable[Concatenate[_S, _P], Coroutine[Any, Any, _T]]:
    """A Redis call whose connection or timeout error is `StateUnavailable` (every Redis-backed store's)."""
    from redis.exceptions import RedisError

    @functools.wraps(method)
    async def call(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(self, *args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(type(exc).__name__) from None

    return call


def redis_client(config: Sessions) -> Any:
    """A client of the state store's Redis (`sessions.url`), which reconnects by itself once it is back."""
    import redis.asyncio

    assert config.url is not None
    return redis.asyncio.from_url(config.url, socket_timeout=2, socket_connect_timeout=2)


class RedisSessions:
    _PREFIX = "mcpgw:session:"
    _EXPIRIES = "mcpgw:sessions"
    _TOKEN = "mcpgw:token:"
    _TOKENS = "mcpgw:tokens"

    def __init__(self, config: Sessions) -> None:
        self._redis = redis_client(config)
        self._ttl = int(config.ttl_s)

    @property
    def client(self) -> Any:
        """The Redis client, for another store that lives in the same Redis (the rate limits' buckets)."""
        return self._redis

    @reached
    async def bind(self, session_id: str, identity: Identity) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._PREFIX + session_id, orjson.dumps(identity), ex=self._ttl)
            pipe.zadd(self._EXPIRIES, {session_id: time.time() + self._ttl})
            await pipe.execute()

    @reached
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

    @reached
    async def end(self, session_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._PREFIX + session_id)
            pipe.zrem(self._EXPIRIES, session_id)
            await pipe.execute()

    @reached
    async def active(self) -> int:
        now = time.time()
        await self._redis.zremrangebyscore(self._EXPIRIES, "-inf", now)
        return int(await self._redis.zcard(self._EXPIRIES))

    @reached
    async def revoke(self, token_id: str, until: float) -> None:
        ttl = max(1, int(until - time.time()) + 1)
        await self._redis.set(f"mcpgw:revoked:{token_id}", b"1", ex=ttl)

    @reached
    async def revoked(self, token_id: str) -> bool:
        return bool(await self._redis.exists(f"mcpgw:revoked:{token_id}"))

    @reached
    async def open_token(self, session: TokenSession) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._store_token(pipe, session)
            await pipe.execute()

    @reached
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

    @reached
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

    @reached
    async def own_task(self, upstream: str, task_id: str, identity: Identity, ttl_s: float) -> None:
        await self._redis.set(f"mcpgw:task:{upstream}:{task_id}", orjson.dumps(identity),
                              ex=max(1, int(min(ttl_s, _MAX_HANDLE_TTL_S))))

    @reached
    async def owned_tasks(self, upstream: str, identity: Identity, task_ids: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(task_ids))
        if not wanted:
            return set()
        owners = await self._redis.mget([f"mcpgw:task:{upstream}:{t}" for t in wanted])
        mine = orjson.dumps(identity)
        return {t for t, owner in zip(wanted, owners, strict=True) if owner == mine}

    @reached
    async def expect_answer(self, key: str, identity: Identity, kind: str, ttl_s: float) -> None:
        await self._redis.set(f"mcpgw:pending:{key}", orjson.dumps([identity, kind]),
                              ex=max(1, int(min(ttl_s, _MAX_HANDLE_TTL_S))))

    @reached
    async def take_answer(self, key: str) -> tuple[Identity, str] | None:
        raw = await self._redis.getdel(f"mcpgw:pending:{key}")
        if raw is None:
            return None
        (issuer, subject, client), kind = orjson.loads(raw)
        return (str(issuer), str(subject), str(client)), str(kind)

    @reached
    async def claim_once(self, key: str, ttl_s: float) -> bool:
        return bool(await self._redis.set(f"mcpgw:once:{key}", b"1", nx=True, ex=max(1, math.ceil(ttl_s))))

    @reached
    async def tally(self, key: str, window_s: float, add: int = 1) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(f"mcpgw:tally:{key}", add)
            pipe.expire(f"mcpgw:tally:{key}", max(1, math.ceil(window_s)), nx=True)
            count, _ = await pipe.execute()
        return int(count)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def open_sessions(config: Sessions) -> SessionStore:
    return RedisSessions(config) if config.backend == "redis" else MemorySessions(config)
