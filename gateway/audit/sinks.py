"""Audit sinks: where batches of events are written. Each `write` is called from the writer task only.

SQLite runs in WAL mode with one transaction per batch (in a worker thread, so
the event loop never waits on disk); JSONL appends one line per event and
flushes once per batch.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Protocol

import orjson

from gateway.audit.event import AuditEvent

_COLUMNS = tuple(AuditEvent.__dataclass_fields__)


class Sink(Protocol):
    name: str

    async def write(self, events: list[AuditEvent]) -> None: ...

    async def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self.name = f"jsonl:{path}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("ab")

    async def write(self, events: list[AuditEvent]) -> None:
        lines = b"".join(orjson.dumps(event.to_dict()) + b"\n" for event in events)
        await asyncio.to_thread(self._append, lines)

    def _append(self, lines: bytes) -> None:
        self._handle.write(lines)
        self._handle.flush()

    async def close(self) -> None:
        self._handle.close()


class SqliteSink:
    def __init__(self, path: Path) -> None:
        self.name = f"sqlite:{path}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        columns = ", ".join(f"{c} TEXT PRIMARY KEY" if c == "id" else c for c in _COLUMNS)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS audit_events ({columns})")
        self._db.execute("CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (timestamp)")
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._insert = f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) VALUES ({placeholders})"

    async def write(self, events: list[AuditEvent]) -> None:
        rows = [
            tuple(",".join(v) if isinstance(v, tuple) else v for v in (getattr(e, c) for c in _COLUMNS))
            for e in events
        ]
        await asyncio.to_thread(self._insert_rows, rows)

    def _insert_rows(self, rows: list[tuple[object, ...]]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(self._insert, rows)

    async def close(self) -> None:
        self._db.close()
