"""The backends of `gateway.assignments.AssignmentStore`: where runtime role assignments persist.

    sqlite    one file (mode 0600), table `role_assignments`; every call a short statement in a worker thread,
              one at a time per store. Generation: `PRAGMA data_version` (which changes only when ANOTHER
              connection, of this process or another, commits) with a count of this store's own writes
    postgres  asyncpg pool; table `<table>` and a one-row `<table>_generation`, whose value is set anew in
              the same transaction as each change
    redis     `<prefix>assignments`, a hash of id -> the assignment's JSON, and `<prefix>generation`, both
              written in one MULTI

The postgres and redis generations are a random token set with each change rather than a counter: a counter
starts again when its row or key is lost (a FLUSHDB, a table recreated) and could come back to the very value
an idle replica remembers, which would then keep serving assignments that no longer exist.

Expired assignments are never returned; they are deleted as the next assignment is added. A backend that
cannot be reached (refused, timed out, connection lost, a SQLite file locked past its timeout or unreadable) raises
`StateUnavailable`: the request that asked is refused (503), never decided with fewer or more roles.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import orjson

from gateway.assignments import Assignment
from gateway.errors import StateUnavailable
from gateway.private_files import private_directory

_FIELDS = ("id", "subject", "client_id", "role", "assigned_by", "assigned_at", "expires_at", "reason")
_P = ParamSpec("_P")
_T = TypeVar("_T")


class _Reaching(Protocol):
    # The errors that mean the backend cannot be reached now (not: the gateway asked it something wrong).
    unreachable: tuple[type[Exception], ...]


_B = TypeVar("_B", bound=_Reaching)


def _reached(method: Callable[Concatenate[_B, _P], Coroutine[Any, Any, _T]]
             ) -> Callable[Concatenate[_B, _P], Coroutine[Any, Any, _T]]:
    """A backend call whose `unreachable` errors are `StateUnavailable`."""

    @functools.wraps(method)
    async def call(self: _B, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(self, *args, **kwargs)
        except self.unreachable as exc:
            raise StateUnavailable(type(exc).__name__) from None

    return call


def _new_generation() -> str:
    return secrets.token_hex(16)


class SqliteAssignments:
    """Assignments in a SQLite file, shared by the processes (workers) of one host that open the same path."""

    def __init__(self, path: Path) -> None:
        self.name = f"sqlite:{path}"
        self.unreachable: tuple[type[Exception], ...] = (sqlite3.DatabaseError, OSError)  # locked, corrupt, gone
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one statement at a time on the one connection
        self._own_writes = 0

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            private_directory(self._path.parent)
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))  # sqlite would make 0644
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA busy_timeout=5000")
                db.execute("PRAGMA journal_mode=WAL")  # readers (every request) never wait for a writer
                db.execute("CREATE TABLE IF NOT EXISTS role_assignments (id TEXT PRIMARY KEY, subject TEXT NOT NULL, "
                           "client_id TEXT, role TEXT NOT NULL, assigned_by TEXT NOT NULL, "
                           "assigned_at REAL NOT NULL, expires_at REAL, reason TEXT NOT NULL)")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        def locked() -> _T:
            with self._lock:
                return work(self._connection())

        return await asyncio.to_thread(locked)

    @_reached
    async def add(self, a: Assignment) -> None:
        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM role_assignments WHERE expires_at <= ?", (time.time(),))
                db.execute(f"INSERT INTO role_assignments ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * 8)})",
                           tuple(a.as_dict()[k] for k in _FIELDS))
                self._own_writes += 1

        await self._run(write)

    @_reached
    async def remove(self, assignment_id: str) -> Assignment | None:
        def delete(db: sqlite3.Connection) -> Assignment | None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute(f"SELECT {', '.join(_FIELDS)} FROM role_assignments WHERE id = ?",
                                 (assignment_id,)).fetchone()
                if row is None:
                    return None
                db.execute("DELETE FROM role_assignments WHERE id = ?", (assignment_id,))
                self._own_writes += 1
            return Assignment.from_dict(dict(zip(_FIELDS, row, strict=True)))

        return await self._run(delete)

    @_reached
    async def all(self) -> list[Assignment]:
        def read(db: sqlite3.Connection) -> list[Assignment]:
            rows = db.execute(f"SELECT {', '.join(_FIELDS)} FROM role_assignments "
                              "WHERE expires_at IS NULL OR expires_at > ?", (time.time(),)).fetchall()
            return [Assignment.from_dict(dict(zip(_FIELDS, row, strict=True))) for row in rows]

        return await self._run(read)

    @_reached
    async def generation(self) -> str:
        # Asked on every request: read on the event loop when the connection is free (in WAL mode this reads
        # the shared-memory index only and never waits for a writer); else in the worker thread, in turn.
        if self._lock.acquire(blocking=False):
            try:
                if self._db is not None:
                    return self._generation(self._db)
            finally:
                self._lock.release()
        return await self._run(self._generation)

    def _generation(self, db: sqlite3.Connection) -> str:
        return f"{db.execute('PRAGMA data_version').fetchone()[0]}.{self._own_writes}"

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.to_thread(close)


class PostgresAssignments:
    """Assignments in a PostgreSQL table, shared by every replica given the same `dsn` and `table`."""

    def __init__(self, dsn: str, table: str = "role_assignments") -> None:
        import asyncpg  # type: ignore[import-untyped]  # no stubs published

        self.name = f"postgres:{table}"
        self.unreachable: tuple[type[Exception], ...] = (
            OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
            asyncpg.OperatorInterventionError)  # the last: shutting down, or not accepting connections yet
        self._dsn = dsn
        self._table = table  # an identifier: the config's pattern admits nothing else
        self._generation = f"{table}_generation"
        self._pool: Any = None
        self._opening = asyncio.Lock()

    async def _connected(self) -> Any:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    import asyncpg

                    pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=10, timeout=5, command_timeout=5)
                    try:
                        await self._create(pool)
                    except BaseException:
                        await pool.close()
                        raise
                    self._pool = pool
        return self._pool

    async def _create(self, pool: Any) -> None:
        async with pool.acquire() as conn, conn.transaction():
            # Replicas starting at once: one creates the tables, the others then find them.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._table)
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {self._table} (id text PRIMARY KEY, "
                               "subject text NOT NULL, client_id text, role text NOT NULL, assigned_by text NOT NULL, "
                               "assigned_at double precision NOT NULL, expires_at double precision, "
                               "reason text NOT NULL)")
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {self._generation} "
                               "(one boolean PRIMARY KEY DEFAULT true CHECK (one), value text NOT NULL)")
            await conn.execute(f"INSERT INTO {self._generation} (value) VALUES ($1) ON CONFLICT DO NOTHING",
                               _new_generation())

    async def _bump(self, conn: Any) -> None:
        # An upsert: were the row lost, an UPDATE would change nothing and no replica would see a change again.
        await conn.execute(f"INSERT INTO {self._generation} (value) VALUES ($1) "
                           "ON CONFLICT (one) DO UPDATE SET value = EXCLUDED.value", _new_generation())

    @_reached
    async def add(self, a: Assignment) -> None:
        pool = await self._connected()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(f"DELETE FROM {self._table} WHERE expires_at <= $1", time.time())
            await conn.execute(f"INSERT INTO {self._table} ({', '.join(_FIELDS)}) "
                               f"VALUES ({', '.join(f'${i}' for i in range(1, 9))})",
                               *(a.as_dict()[k] for k in _FIELDS))
            await self._bump(conn)

    @_reached
    async def remove(self, assignment_id: str) -> Assignment | None:
        pool = await self._connected()
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"DELETE FROM {self._table} WHERE id = $1 RETURNING *", assignment_id)
            if row is not None:
                await self._bump(conn)
        return None if row is None else Assignment.from_dict(dict(row))

    @_reached
    async def all(self) -> list[Assignment]:
        pool = await self._connected()
        rows = await pool.fetch(f"SELECT * FROM {self._table} WHERE expires_at IS NULL OR expires_at > $1",
                                time.time())
        return [Assignment.from_dict(dict(row)) for row in rows]

    @_reached
    async def generation(self) -> str:
        pool = await self._connected()
        return str(await pool.fetchval(f"SELECT value FROM {self._generation}"))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class RedisAssignments:
    """Assignments in Redis, shared by every replica given the same `url` (and `prefix`)."""

    def __init__(self, url: str, prefix: str = "mcpgw:roles:") -> None:
        import redis.asyncio
        from redis.exceptions import RedisError

        self.name = f"redis:{prefix}"
        self.unreachable: tuple[type[Exception], ...] = (RedisError, OSError)
        # Every request asks for the generation: past max_connections at once, a request waits for a connection
        # (up to `timeout`) rather than failing.
        self._redis = redis.asyncio.Redis.from_pool(redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=2, socket_timeout=2, socket_connect_timeout=2))
        self._hash = f"{prefix}assignments"
        self._generation = f"{prefix}generation"

    async def _stored(self) -> list[Assignment]:
        return [Assignment.from_dict(orjson.loads(raw)) for raw in (await self._redis.hgetall(self._hash)).values()]

    @_reached
    async def add(self, a: Assignment) -> None:
        now = time.time()
        # Read outside the MULTI: an assignment once expired stays so, and ids are never reused.
        expired = [found.id for found in await self._stored() if not found.active(now)]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._hash, a.id, orjson.dumps(a.as_dict()))
            if expired:
                pipe.hdel(self._hash, *expired)
            pipe.set(self._generation, _new_generation())
            await pipe.execute()

    @_reached
    async def remove(self, assignment_id: str) -> Assignment | None:
        # One MULTI reads and deletes: of two removals at once, one gets the assignment and the other None.
        # (The generation changes even when there was nothing to remove: one extra read for each replica.)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._hash, assignment_id)
            pipe.hdel(self._hash, assignment_id)
            pipe.set(self._generation, _new_generation())
            raw, deleted, _ = await pipe.execute()
        return Assignment.from_dict(orjson.loads(raw)) if deleted else None

    @_reached
    async def all(self) -> list[Assignment]:
        now = time.time()
        return [a for a in await self._stored() if a.active(now)]

    @_reached
    async def generation(self) -> str:
        value = await self._redis.get(self._generation)
        return value.decode() if isinstance(value, bytes) else str(value or "")

    async def close(self) -> None:
        await self._redis.aclose()
