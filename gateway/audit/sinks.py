"""Audit sinks: where sealed batches are written, and how they are read back (queries, chain verification).

Each writer keeps its own hash chain in each sink, sealed under the chain key
the writer passes in and anchored to the last event the sink held when the
writer started (several workers or replicas may share a sink; see
`event.verify_chain`). A batch is written whole or not at all (a transaction; for
JSONL, a failed append is cut back), so a retried batch is never stored twice.
A table created before a column of `AuditEvent` existed gets that column when
the sink opens (rows written before it hold NULL there).

    sqlite    WAL mode, one transaction per batch, in a worker thread (the event loop never waits on disk)
    jsonl     one line per event, flushed per batch; rotated past rotate_mb (audit.jsonl.1, .2, ...)
    postgres  asyncpg, COPY per batch in a transaction, reconnecting after a lost connection
"""

from __future__ import annotations

import asyncio
import operator
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import orjson

from gateway.audit.event import COLUMNS, GENESIS, AuditEvent, ChainKey, ChainReport, Sealed, seal, verify_chain
from gateway.config import AuditSink

_SQL_COLUMNS = (*COLUMNS, "record", "prev_hash", "hash")


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which events to read back. Times are UNIX seconds; every given field must match exactly."""

    since: float | None = None
    until: float | None = None
    user_id: str | None = None
    client_id: str | None = None
    operation: str | None = None
    tool: str | None = None
    resource: str | None = None
    result: str | None = None
    rule: str | None = None
    policy_version: str | None = None
    would_deny: str | None = None
    limit: int = 100
    offset: int = 0

    def filters(self) -> list[tuple[str, str, Any]]:
        """(column, operator, value) for every condition given."""
        out: list[tuple[str, str, Any]] = []
        if self.since is not None:
            out.append(("timestamp", ">=", self.since))
        if self.until is not None:
            out.append(("timestamp", "<", self.until))
        for column, value in (("user_id", self.user_id), ("client_id", self.client_id),
                              ("operation", self.operation), ("tool_executed", self.tool),
                              ("resource_accessed", self.resource), ("result", self.result), ("rule", self.rule),
                              ("policy_version", self.policy_version), ("would_deny", self.would_deny)):
            if value is not None:
                out.append((column, "=", value))
        return out

    def matches(self, event: dict[str, Any]) -> bool:
        for column, op, value in self.filters():
            actual = event.get(column)
            if op == "=" and actual != value:
                return False
            if op == ">=" and (actual is None or actual < value):
                return False
            if op == "<" and (actual is None or actual >= value):
                return False
        return True


class Sink(Protocol):
    name: str

    async def open(self) -> None: ...

    async def write(self, events: list[AuditEvent], key: ChainKey) -> None: ...

    async def close(self) -> None: ...

    async def query(self, query: AuditQuery) -> list[dict[str, Any]]: ...

    async def verify(self, key: ChainKey) -> ChainReport: ...


_FIELDS = operator.attrgetter(*COLUMNS)
_JOINED = tuple(i for i, c in enumerate(COLUMNS) if c == "roles")  # stored joined with ","
_FLAGS = tuple(i for i, c in enumerate(COLUMNS) if c in ("approval_required", "approval_granted"))  # stored 0/1


def _row(sealed: Sealed) -> tuple[Any, ...]:
    """The columns of one sealed event, in _SQL_COLUMNS order (read in one C call: this runs per event)."""
    values = list(_FIELDS(sealed.event))
    for i in _JOINED:
        values[i] = ",".join(values[i])
    for i in _FLAGS:
        if values[i] is not None:
            values[i] = int(values[i])
    values += (sealed.record.decode(), sealed.prev_hash, sealed.hash)
    return tuple(values)


def _event_dict(row: dict[str, Any]) -> dict[str, Any]:
    """An event as queries return it: the sealed record, which is what the chain vouches for."""
    return dict(orjson.loads(row["record"]))


class SqliteSink:
    def __init__(self, path: Path) -> None:
        self.name = f"sqlite:{path}"
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._last = GENESIS

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=10000")  # other workers' writers share the file
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        columns = ", ".join(f"{c} TEXT UNIQUE NOT NULL" if c == "id" else c for c in _SQL_COLUMNS)
        with db:
            db.execute("BEGIN IMMEDIATE")  # workers opening the file at once: one creates or upgrades the table
            db.execute(f"CREATE TABLE IF NOT EXISTS audit_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, {columns})")
            db.execute("CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (timestamp)")
            have = {row[1] for row in db.execute("PRAGMA table_info(audit_events)")}
            for column in _SQL_COLUMNS:
                if column not in have:
                    db.execute(f"ALTER TABLE audit_events ADD COLUMN {column}")
            last = db.execute("SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
        self._last = last[0] if last else GENESIS
        self._db = db

    async def write(self, events: list[AuditEvent], key: ChainKey) -> None:
        sealed = seal(events, self._last, key)
        await asyncio.to_thread(self._insert, [_row(s) for s in sealed])
        self._last = sealed[-1].hash

    # A batch is one multi-row INSERT per _ROWS_PER_STATEMENT rows: one sqlite3_step, so the worker thread
    # gives the GIL back once. With executemany it gave it back and waited for it again around every row, and
    # while the event loop is busy each wait can take a switch interval (under load: ~800 events/s written
    # against a ceiling of ~18,000). Plain parameters, not a JSON array unpacked in SQL: SQLite 3.40 parses
    # the array again for every json_extract, once per column of every row.
    # Statements of 512, 256, ... 1 rows (29 parameters a row, under SQLite's 32,766): a batch of any size is a
    # few of them, and the ten texts stay in the connection's statement cache, compiled once.
    _SIZES = tuple(2**i for i in range(9, -1, -1))
    _STATEMENTS: ClassVar[dict[int, str]] = {size: f"INSERT INTO audit_events ({', '.join(_SQL_COLUMNS)}) VALUES "
                   + ",".join(["(" + ",".join("?" * len(_SQL_COLUMNS)) + ")"] * size) for size in _SIZES}

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            start = 0
            while start < len(rows):
                size = next(s for s in self._SIZES if s <= len(rows) - start)
                self._db.execute(self._STATEMENTS[size], [v for row in rows[start:start + size] for v in row])
                start += size

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _read(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        db = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in db.execute(sql, params)]
        finally:
            db.close()

    async def query(self, query: AuditQuery) -> list[dict[str, Any]]:
        where = " AND ".join(f"{c} {op} ?" for c, op, _ in query.filters()) or "1=1"
        params = [v for _, _, v in query.filters()] + [query.limit, query.offset]
        rows = await asyncio.to_thread(self._read, f"SELECT record FROM audit_events WHERE {where} "
                                       "ORDER BY timestamp, seq LIMIT ? OFFSET ?", params)
        return [_event_dict(r) for r in rows]

    async def verify(self, key: ChainKey) -> ChainReport:
        rows = await asyncio.to_thread(self._read, "SELECT * FROM audit_events ORDER BY seq", [])
        return verify_chain(_chain_rows(rows), key)


def _chain_rows(rows: list[dict[str, Any]]) -> Iterator[tuple[bytes, str, str, dict[str, Any] | None]]:
    for row in rows:
        columns = {c: row[c] for c in COLUMNS if c in row}
        yield str(row["record"]).encode(), row["prev_hash"], row["hash"], columns


class JsonlSink:
    def __init__(self, path: Path, rotate_mb: float | None = None) -> None:
        self.name = f"jsonl:{path}"
        self._path = path
        self._rotate_bytes = int(rotate_mb * 1024 * 1024) if rotate_mb else None
        self._last = GENESIS

    def _files(self) -> list[Path]:
        """Rotated files oldest first, then the current one."""
        rotated = sorted((p for p in self._path.parent.glob(self._path.name + ".*") if p.suffix[1:].isdigit()),
                         key=lambda p: int(p.suffix[1:]))
        return [*rotated, self._path] if self._path.exists() else rotated

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        files = self._files()
        self._last = await asyncio.to_thread(_last_hash_of, files[-1]) if files else GENESIS

    async def write(self, events: list[AuditEvent], key: ChainKey) -> None:
        sealed = seal(events, self._last, key)
        lines = b"".join(s.record[:-1] + b',"prev_hash":"' + s.prev_hash.encode() + b'","hash":"'
                         + s.hash.encode() + b'"}\n' for s in sealed)
        await asyncio.to_thread(self._append, lines)
        self._last = sealed[-1].hash

    def _append(self, lines: bytes) -> None:
        if self._rotate_bytes and self._path.exists() and self._path.stat().st_size >= self._rotate_bytes:
            taken = [int(p.suffix[1:]) for p in self._files() if p != self._path]
            self._path.rename(self._path.with_name(f"{self._path.name}.{max(taken, default=0) + 1}"))
        with self._path.open("ab") as handle:
            start = handle.tell()
            try:
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())
            except OSError:
                handle.truncate(start)  # never leave half a batch: the retry writes it whole
                raise

    async def close(self) -> None:
        return None

    def _events(self) -> Iterator[bytes]:
        for path in self._files():
            with path.open("rb") as handle:
                for line in handle:
                    if line.strip():
                        yield line

    async def query(self, query: AuditQuery) -> list[dict[str, Any]]:
        def scan() -> list[dict[str, Any]]:
            found = []
            for line in self._events():
                event = orjson.loads(line)
                event.pop("hash", None)
                event.pop("prev_hash", None)
                if query.matches(event):
                    found.append(event)
            found.sort(key=lambda e: e.get("timestamp") or 0)
            return found[query.offset: query.offset + query.limit]

        return await asyncio.to_thread(scan)

    async def verify(self, key: ChainKey) -> ChainReport:
        def rows() -> Iterator[tuple[bytes, str, str, dict[str, Any] | None]]:
            for line in self._events():
                event = orjson.loads(line)
                prev, digest = event.pop("prev_hash", ""), event.pop("hash", "")
                yield orjson.dumps(event, option=orjson.OPT_SORT_KEYS), prev, digest, None

        return await asyncio.to_thread(lambda: verify_chain(rows(), key))


def _last_hash_of(path: Path) -> str:
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 65536))
        lines = [line for line in handle.read().splitlines() if line.strip()]
    if not lines:
        return GENESIS
    return str(orjson.loads(lines[-1])["hash"])


_PG_TYPES = {"timestamp": "double precision", "status": "integer", "duration_ms": "double precision",
             "upstream_process": "integer",
             "approval_required": "integer", "approval_granted": "integer"}  # the rest are text


class PostgresSink:
    def __init__(self, dsn: str, table: str = "audit_events") -> None:
        self.name = f"postgres:{table}"
        self._dsn = dsn
        self._table = table
        self._conn: Any = None
        self._last = GENESIS
        self._unsure = False  # the last write failed after it was sent: it may have committed all the same

    async def _connection(self) -> Any:
        import asyncpg  # type: ignore[import-untyped]  # no stubs published

        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=5)
        return self._conn

    async def open(self) -> None:
        conn = await self._connection()
        columns = ", ".join(f"{c} {_PG_TYPES.get(c, 'text')}" + (" UNIQUE NOT NULL" if c == "id" else "")
                            for c in _SQL_COLUMNS)
        async with conn.transaction():
            # Replicas starting at once on a new table: one creates it, the others then find it. IF NOT EXISTS
            # alone does not hold against a concurrent CREATE (a duplicate key in pg_class: the open fails).
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._table)
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {self._table} (seq bigserial PRIMARY KEY, {columns})")
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {self._table}_time ON {self._table} (timestamp)")
            # Only for a missing column: ALTER TABLE locks the table against readers even when it changes
            # nothing. regclass resolves the name as the statements above do (search_path, unquoted case folding).
            have = {row["attname"] for row in await conn.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
                self._table)}
            for column in _SQL_COLUMNS:
                if column not in have:
                    await conn.execute(f"ALTER TABLE {self._table} ADD COLUMN IF NOT EXISTS {column} "
                                       f"{_PG_TYPES.get(column, 'text')}")
        last = await conn.fetchval(f"SELECT hash FROM {self._table} ORDER BY seq DESC LIMIT 1")
        self._last = last or GENESIS

    async def write(self, events: list[AuditEvent], key: ChainKey) -> None:
        sealed = seal(events, self._last, key)
        try:
            conn = await self._connection()
            # A connection lost after COMMIT went out leaves the batch committed or not, and the writer tries the
            # same batch again: if it is there (whole: one transaction), it is written; a second COPY would fail
            # on its ids at every retry, and the sink would never recover.
            if not (self._unsure and await conn.fetchval(f"SELECT 1 FROM {self._table} WHERE id = $1 AND hash = $2",
                                                         sealed[-1].event.id, sealed[-1].hash)):
                async with conn.transaction():
                    await conn.copy_records_to_table(self._table, records=[_row(s) for s in sealed],
                                                     columns=list(_SQL_COLUMNS))
        except Exception:
            self._unsure = True
            if self._conn is not None and not self._conn.is_closed():
                await self._conn.close()
            self._conn = None
            raise
        self._unsure = False
        self._last = sealed[-1].hash

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def query(self, query: AuditQuery) -> list[dict[str, Any]]:
        filters = query.filters()
        where = " AND ".join(f"{c} {op} ${i + 1}" for i, (c, op, _) in enumerate(filters)) or "TRUE"
        n = len(filters)
        conn = await self._connection()
        rows = await conn.fetch(f"SELECT record FROM {self._table} WHERE {where} ORDER BY timestamp, seq "
                                f"LIMIT ${n + 1} OFFSET ${n + 2}", *[v for _, _, v in filters],
                                query.limit, query.offset)
        return [_event_dict(dict(r)) for r in rows]

    async def verify(self, key: ChainKey) -> ChainReport:
        conn = await self._connection()
        rows = [dict(r) for r in await conn.fetch(f"SELECT * FROM {self._table} ORDER BY seq")]
        return verify_chain(_chain_rows(rows), key)


def open_sink(spec: AuditSink) -> Sink:
    """A sink object for one `audit.sinks[]` entry (not yet opened)."""
    if spec.type == "sqlite":
        assert spec.path is not None
        return SqliteSink(spec.path)
    if spec.type == "jsonl":
        assert spec.path is not None
        return JsonlSink(spec.path, spec.rotate_mb)
    assert spec.dsn is not None
    return PostgresSink(spec.dsn, spec.table)
