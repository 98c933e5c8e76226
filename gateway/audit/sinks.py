"""Audit sinks: where sealed batches are written, and how they are read back (queries, chain verification).

Each writer keeps its own hash chain in each sink, sealed under the chain key
the writer passes in and anchored to the last event the sink held when the
writer started (several workers or replicas may share a sink; see
`event.verify_chain`). A batch is written whole or not at all (a transaction; for
JSONL, a failed append is cut back), so a retried batch is never stored twice.
A table created before a column of `AuditEvent` existed gets that column when
the sink opens (rows written before it hold NULL there). A file or directory a
sink creates is its owner's only (0600, 0700): the trail holds who did what; a
file found open to every user is left as it is, with a warning.

Reading back (`query`, `count`, `verify`) raises `SinkUnreadable`, saying why,
for a sink that does not exist yet or cannot be reached; so does any use of a
PostgreSQL sink whose DSN cannot be read. A message shows a DSN as
`url_redaction.redact_url` does: it reaches the admin API, the CLI and the log.

    sqlite    WAL mode, one transaction per batch, in a worker thread (the event loop never waits on disk);
              the WAL is checkpointed in another thread on a connection of its own, never inside a commit
    jsonl     one line per event, flushed per batch; rotated past rotate_mb (audit.jsonl.1, .2, ...)
    postgres  asyncpg, COPY per batch in a transaction, reconnecting after a lost connection
"""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import orjson

from gateway.audit.event import COLUMNS, GENESIS, AuditEvent, ChainKey, ChainReport, Sealed, seal, verify_chain
from gateway.config import AuditSink
from gateway.exceptions import GatewayError
from gateway.private_files import owner_only, private_directory
from gateway.url_redaction import redact_url

log = logging.getLogger("gateway.audit")

_SQL_COLUMNS = (*COLUMNS, "record", "prev_hash", "hash")
_NOTHING_YET = "(nothing recorded yet?)"


class SinkUnreadable(GatewayError):
    """An audit sink cannot be read back: it does not exist yet, or cannot be reached (nor, for a DSN that cannot
    be read, written). The message names the sink and says why, showing no credential."""

    def __init__(self, sink: str, why: str) -> None:
        super().__init__(f"audit sink {sink}: {why}")


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
    order: Literal["oldest", "newest"] = "oldest"  # which end of the matching events a page starts from

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


def _where(query: AuditQuery, placeholder: Callable[[int], str]) -> tuple[str, list[Any]]:
    """The SQL condition of `query.filters()` (the i-th value's placeholder is `placeholder(i)`), and its values."""
    filters = query.filters()
    condition = " AND ".join(f"{c} {op} {placeholder(i)}" for i, (c, op, _) in enumerate(filters))
    return condition or "1=1", [v for _, _, v in filters]


# seq: events of one instant in the order they were written
_ORDER = {"oldest": "ORDER BY timestamp, seq", "newest": "ORDER BY timestamp DESC, seq DESC"}


class Sink(Protocol):
    name: str

    async def open(self) -> None: ...

    async def write(self, events: list[AuditEvent], key: ChainKey) -> None: ...

    async def close(self) -> None: ...

    async def query(self, query: AuditQuery) -> list[dict[str, Any]]: ...

    async def count(self, query: AuditQuery) -> int: ...  # how many match, whatever the limit and offset

    async def verify(self, key: ChainKey) -> ChainReport: ...


def _warn_if_open_to_all(*paths: Path) -> None:
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            log.warning("audit file %s is open to every user (mode %04o): chmod 600 it", path, mode)


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


# Rows and commits written after which the WAL is checkpointed (SQLite's own default, 1,000 pages, is some 2,000
# rows or 500 single-row commits).
_CHECKPOINT_ROWS = 2000
_CHECKPOINT_COMMITS = 500
_COMMIT_CHECKPOINT_PAGES = 4000  # 16 MB of WAL: past it a commit checkpoints, as SQLite does by default at 1,000


class SqliteSink:
    """With `synchronous=NORMAL` a commit appends to the WAL and syncs nothing; a checkpoint copies the WAL into
    the database and syncs both. SQLite runs one inside whichever commit crosses `wal_autocheckpoint` pages
    (1,000 by default): an answer waiting for its event (`durability: written`) then waits for two syncs (B12:
    1.7% of commits at c=1, p99 4.1 ms against 2.0 ms with no checkpoint at all). Here a PASSIVE checkpoint,
    which never blocks a writer, runs in another thread every _CHECKPOINT_ROWS rows or _CHECKPOINT_COMMITS
    commits and does most of that copying off the commit path. One that ran while commits went on cannot rewind
    the WAL, so commits still checkpoint, but only every _COMMIT_CHECKPOINT_PAGES pages (a few times less
    often, with little left to copy), which is also what bounds the WAL."""

    def __init__(self, path: Path) -> None:
        self.name = f"sqlite:{path}"
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self._rows = self._commits = 0  # since the last checkpoint began
        self._last = GENESIS

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        private_directory(self._path.parent)
        try:  # created here, empty (an empty file is an empty database), so that SQLite never creates it 0644
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            _warn_if_open_to_all(self._path)
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=10000")  # other workers' writers share the file
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA wal_autocheckpoint={_COMMIT_CHECKPOINT_PAGES}")  # the rest: _checkpoint's
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
        self._checkpointer = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)

    async def write(self, events: list[AuditEvent], key: ChainKey) -> None:
        sealed = seal(events, self._last, key)
        await asyncio.to_thread(self._insert, [_row(s) for s in sealed])
        self._last = sealed[-1].hash
        self._rows += len(events)
        self._commits += 1
        due = self._rows >= _CHECKPOINT_ROWS or self._commits >= _CHECKPOINT_COMMITS
        if due and (self._checkpointing is None or self._checkpointing.done()):
            self._rows = self._commits = 0
            self._checkpointing = asyncio.get_running_loop().create_task(asyncio.to_thread(self._checkpoint))

    def _checkpoint(self) -> None:
        assert self._checkpointer is not None
        try:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the next one will try again; the WAL keeps every commit meanwhile
            log.warning("audit sink %s: WAL checkpoint failed: %s", self.name, exc)

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
        if self._checkpointing is not None:
            await self._checkpointing
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._db is not None:
            self._db.close()
            self._db = None

    def _read(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        if not self._path.exists():  # read-only: never created here
            raise SinkUnreadable(self.name, f"no such file {_NOTHING_YET}")
        try:
            db = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True)
            db.row_factory = sqlite3.Row
            try:
                return [dict(row) for row in db.execute(sql, params)]
            finally:
                db.close()
        except sqlite3.Error as exc:
            why = f"no audit_events table {_NOTHING_YET}" if "no such table" in str(exc) else f"cannot be read: {exc}"
            raise SinkUnreadable(self.name, why) from None

    async def query(self, query: AuditQuery) -> list[dict[str, Any]]:
        where, params = _where(query, lambda _: "?")
        rows = await asyncio.to_thread(self._read, f"SELECT record FROM audit_events WHERE {where} "
                                       f"{_ORDER[query.order]} LIMIT ? OFFSET ?", [*params, query.limit, query.offset])
        return [_event_dict(r) for r in rows]

    async def count(self, query: AuditQuery) -> int:
        where, params = _where(query, lambda _: "?")
        rows = await asyncio.to_thread(self._read, f"SELECT count(*) AS n FROM audit_events WHERE {where}", params)
        return int(rows[0]["n"])

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
        private_directory(self._path.parent)
        files = self._files()
        _warn_if_open_to_all(*files)
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
        with open(self._path, "ab", opener=owner_only) as handle:
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
        files = self._files()
        if not files:
            raise SinkUnreadable(self.name, f"no such file {_NOTHING_YET}")
        for path in files:
            try:
                with path.open("rb") as handle:
                    yield from (line for line in handle if line.strip())
            except OSError as exc:
                raise SinkUnreadable(self.name, f"{path}: cannot be read: {exc.strerror or exc}") from None

    def _matching(self, query: AuditQuery) -> list[dict[str, Any]]:
        """Every event matching `query`'s filters, in the order of `query.order`."""
        found = []
        for line in self._events():
            event = _json_object(line)
            if event is None:
                raise SinkUnreadable(self.name, "holds a line that is not a JSON object (`audit verify` says which)")
            event.pop("hash", None)
            event.pop("prev_hash", None)
            if query.matches(event):
                found.append(event)
        found.sort(key=lambda e: e.get("timestamp") or 0)  # stable: events of one instant in the order written
        if query.order == "newest":
            found.reverse()
        return found

    async def query(self, query: AuditQuery) -> list[dict[str, Any]]:
        found = await asyncio.to_thread(self._matching, query)
        return found[query.offset: query.offset + query.limit]

    async def count(self, query: AuditQuery) -> int:
        return len(await asyncio.to_thread(self._matching, query))

    async def verify(self, key: ChainKey) -> ChainReport:
        def rows() -> Iterator[tuple[bytes, str, str, dict[str, Any] | None]]:
            for line in self._events():
                event = _json_object(line)
                if event is None:
                    yield line, "", "", None  # verify_chain says what it is not
                    continue
                prev, digest = event.pop("prev_hash", ""), event.pop("hash", "")
                yield orjson.dumps(event, option=orjson.OPT_SORT_KEYS), prev, digest, None

        return await asyncio.to_thread(lambda: verify_chain(rows(), key))


def _json_object(line: bytes) -> dict[str, Any] | None:
    """The event a JSONL line holds, or None if it holds no JSON object."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


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
        self._server = redact_url(dsn)  # where the table is, for a person: its messages reach the admin API
        self._table = table
        self._conn: Any = None
        self._last = GENESIS
        self._unsure = False  # the last write failed after it was sent: it may have committed all the same

    async def _connection(self) -> Any:
        import asyncpg  # type: ignore[import-untyped]  # no stubs published

        if self._conn is None or self._conn.is_closed():
            try:
                self._conn = await asyncpg.connect(self._dsn, timeout=5)
            except ValueError:  # its message quotes the part of the DSN it could not read: a password's, maybe
                raise SinkUnreadable(self.name, f"cannot connect to {self._server}: not a DSN (percent-encode "
                                                "any / ? # or @ in the user name or password)") from None
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

    async def _read(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        import asyncpg

        try:
            conn = await self._connection()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise SinkUnreadable(self.name, f"cannot connect to {self._server}: {_reason(exc)}") from None
        try:
            return [dict(r) for r in await conn.fetch(sql, *params)]
        except asyncpg.UndefinedTableError:
            raise SinkUnreadable(self.name, f"no table {self._table} in {self._server} {_NOTHING_YET}") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise SinkUnreadable(self.name, f"cannot be read: {_reason(exc)}") from None

    async def query(self, query: AuditQuery) -> list[dict[str, Any]]:
        where, params = _where(query, lambda i: f"${i + 1}")
        n = len(params)
        rows = await self._read(f"SELECT record FROM {self._table} WHERE {where} {_ORDER[query.order]} "
                                f"LIMIT ${n + 1} OFFSET ${n + 2}", *params, query.limit, query.offset)
        return [_event_dict(r) for r in rows]

    async def count(self, query: AuditQuery) -> int:
        where, params = _where(query, lambda i: f"${i + 1}")
        rows = await self._read(f"SELECT count(*) AS n FROM {self._table} WHERE {where}", *params)
        return int(rows[0]["n"])

    async def verify(self, key: ChainKey) -> ChainReport:
        rows = await self._read(f"SELECT * FROM {self._table} ORDER BY seq")
        return verify_chain(_chain_rows(rows), key)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


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
