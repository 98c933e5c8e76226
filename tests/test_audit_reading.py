"""Reading the audit trail back with `mcp-gateway audit query`: newest first, a page at a time with a line saying
how many more match and where the next page starts, or followed as it grows; the same from every kind of sink.
And the files a sink creates: its owner's only."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.audit.event import AuditEvent, ChainKey
from gateway.audit.reading import column_widths, iso_time, table
from gateway.audit.sinks import open_sink
from gateway.config import AuditSink
from tests.conftest import DSN
from tests.harness import ROOT, free_port, wait_for_port, write_config

UPSTREAM_URL = "http://127.0.0.1:9/mcp"
KEY = ChainKey(os.urandom(32))
T0 = 1_800_000_000.0


@pytest.fixture
def sinks(tmp_path: Path, pg_table: str) -> dict[str, dict[str, Any]]:
    """One sink of each kind (the PostgreSQL one in a table of this test's own)."""
    return {"sqlite": {"type": "sqlite", "path": str(tmp_path / "audit.db")},
            "jsonl": {"type": "jsonl", "path": str(tmp_path / "audit.jsonl")},
            "postgres": {"type": "postgres", "dsn": DSN, "table": pg_table}}


def record(spec: dict[str, Any], events: list[AuditEvent]) -> None:
    """Write `events` to the sink as the gateway's writer does."""
    async def write() -> None:
        sink = open_sink(AuditSink.model_validate(spec))
        await sink.open()
        try:
            await sink.write(events, KEY)
        finally:
            await sink.close()

    asyncio.run(write())


def events(count: int, start: float = T0, **fields: Any) -> list[AuditEvent]:
    return [AuditEvent(result="allowed", reason=f"r{i}", timestamp=round(start + i, 6), **fields)
            for i in range(count)]


def query(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "query", "--config", str(config),
                           "--format", "json", *options], capture_output=True, text=True, cwd=ROOT, timeout=60)


KINDS = ["sqlite", "jsonl", "postgres"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_page_is_the_newest_events_and_says_how_many_more_and_where_the_next_starts(
        tmp_path: Path, sinks: dict[str, dict[str, Any]], kind: str) -> None:
    config = write_config(tmp_path, UPSTREAM_URL, audit={"sinks": [sinks[kind]]})
    written = events(7)
    written.insert(3, AuditEvent(result="denied", reason="other", timestamp=T0 + 3.5, user_id="mallory"))
    record(sinks[kind], written)  # 8 events: r0..r6 one a second, and mallory's between r3 and r4
    pages, until = [], None
    while True:
        done = query(config, "--sink", kind, "--limit", "3", *(["--until", until] if until else []))
        assert done.returncode == 0, done.stderr
        pages.append([e["reason"] for e in json.loads(done.stdout)])
        if not done.stderr:
            break
        more, hint = done.stderr.rstrip("\n").split(" more ", 1)
        oldest = json.loads(done.stdout)[-1]["timestamp"]
        assert hint == f"(use --until {iso_time(oldest)} or --limit)"
        assert int(more) == 8 - sum(map(len, pages))
        until = iso_time(oldest)
    assert pages == [["r6", "r5", "r4"], ["other", "r3", "r2"], ["r1", "r0"]]


@pytest.mark.parametrize("kind", KINDS)
def test_since_until_and_filters_bound_the_pages(tmp_path: Path, sinks: dict[str, dict[str, Any]], kind: str) -> None:
    config = write_config(tmp_path, UPSTREAM_URL, audit={"sinks": [sinks[kind]]})
    record(sinks[kind], [*events(10), *events(3, start=T0 + 0.5, user_id="bob")])
    window = ["--since", iso_time(T0 + 2), "--until", iso_time(T0 + 8)]  # r2 .. r7, and bob's r2 at T0 + 2.5
    done = query(config, "--sink", kind, *window, "--limit", "4")
    assert [e["reason"] for e in json.loads(done.stdout)] == ["r7", "r6", "r5", "r4"]
    assert done.stderr == f"3 more (use --until {iso_time(T0 + 4)} or --limit)\n"
    done = query(config, "--sink", kind, *window, "--limit", "4", "--user", "bob")
    assert ([e["reason"] for e in json.loads(done.stdout)], done.stderr) == (["r2"], "")
    done = query(config, "--sink", kind, *window, "--limit", "4", "--offset", "4")
    assert ([e["reason"] for e in json.loads(done.stdout)], done.stderr) == (["r3", "r2", "r2"], "")


def test_the_table_shows_the_newest_first_and_the_hint_goes_to_stderr(
        tmp_path: Path, sinks: dict[str, dict[str, Any]]) -> None:
    config = write_config(tmp_path, UPSTREAM_URL, audit={"sinks": [sinks["sqlite"]]})
    record(sinks["sqlite"], events(150))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "query", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    lines = done.stdout.splitlines()
    assert (len(lines), lines[-1]) == (102, f"100 event(s) from sqlite:{tmp_path / 'audit.db'}")
    assert lines[1].split()[:3] == ["2027-01-15", "08:02:29", "allowed"]  # T0 + 149 s
    assert done.stderr == f"50 more (use --until {iso_time(T0 + 50)} or --limit)\n"


def test_the_table_prints_what_callers_wrote_with_every_control_character_escaped() -> None:
    forged = "\n2027-01-15 08:00:00  allowed  tools/call  echo"
    lines = table([{"timestamp": T0, "result": "denied", "operation": "tools/call", "status": 403,
                    "tool_executed": "\x1b[2Jwipe\x9b31m", "user_id": "mallory\u2028\x7f", "reason": f"no{forged}\r"}])
    assert len(lines) == 2
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", lines[1]), lines[1]
    for escaped in (r"\u001b[2Jwipe\u009b31m", r"mallory\u2028\u007f", r"no\n2027-01-15 08:00:00"):
        assert escaped in lines[1]


def test_rows_printed_after_their_header_line_up_with_it() -> None:
    page = [{"timestamp": T0, "result": "allowed", "operation": "tools/call", "tool_executed": "echo",
             "user_id": "alice", "reason": "r0", "status": 200}]
    widths = column_widths(page)  # once, as `audit query --follow` prints its header
    header, *rows = table(page, widths)
    rows += table([{"timestamp": T0 + 1, "result": "invalid_request", "operation": "resources/read",
                    "resource_accessed": "file:///" + "x" * 100, "user_id": "someone-" * 10, "client_id": "cli",
                    "reason": "r1", "status": 400}], widths)[1:]
    reason, status = header.index("reason"), header.index("status")
    assert [(row[reason:status].strip(), row[status:]) for row in rows] == [("r0", "200"), ("r1", "400")]
    assert all(len(row) == len(rows[0]) for row in rows)


class Followed:
    """`audit query --follow` running: the reasons of the events it prints, as they come; from its JSON lines, or
    from its table's rows where the header it printed first puts the reason column."""

    def __init__(self, config: Path, form: str, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "audit", "query", "--config", str(config), "--format", form,
             "--follow", *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self._form = form
        self._reason_column: slice | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=lambda out: [self._lines.put(line) for line in out], args=(self.process.stdout,),
                         daemon=True).start()

    def reasons(self, count: int, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout

        def line() -> str:
            return self._lines.get(timeout=deadline - time.monotonic()).rstrip("\n")

        if self._form == "json":
            return [json.loads(line())["reason"] for _ in range(count)]
        if self._reason_column is None:
            header = line()
            self._reason_column = slice(header.index("reason"), header.index("status"))
        return [line()[self._reason_column].strip() for _ in range(count)]

    def nothing_more(self, wait: float) -> bool:
        try:
            self._lines.get(timeout=wait)
        except queue.Empty:
            return True
        return False

    def stop(self, signum: int) -> tuple[int, str]:
        self.process.send_signal(signum)
        _, stderr = self.process.communicate(timeout=10)
        return self.process.returncode, stderr


# Every kind of sink, each signal that stops it and each format: (sink, signal, format), paired.
FOLLOWED = [("sqlite", signal.SIGTERM, "json"), ("jsonl", signal.SIGINT, "table"), ("postgres", signal.SIGINT, "json")]


@pytest.mark.parametrize(("kind", "signum", "form"), FOLLOWED,
                         ids=[f"{kind}-{signal.Signals(signum).name}-{form}" for kind, signum, form in FOLLOWED])
def test_follow_prints_the_newest_then_each_new_event_once_until_stopped(
        tmp_path: Path, sinks: dict[str, dict[str, Any]], kind: str, signum: int, form: str) -> None:
    config = write_config(tmp_path, UPSTREAM_URL, audit={"sinks": [sinks[kind]]})
    now = round(time.time(), 6)
    record(sinks[kind], events(4, start=now - 60))  # r0 .. r3: the page shows the newest two
    followed = Followed(config, form, "--sink", kind, "--limit", "2")
    try:
        assert followed.reasons(2) == ["r2", "r3"]  # oldest first, as a tail
        # wider than anything on the page: a table's row still has its reason under the header's
        record(sinks[kind], [AuditEvent(result="invalid_request", reason="new", timestamp=now,
                                        user_id="someone-with-a-name-longer-than-the-column")])
        assert followed.reasons(1) == ["new"]
        # stamped before "new" but written after it was shown (another replica's writer, a batch held back)
        record(sinks[kind], [AuditEvent(result="allowed", reason="late", timestamp=now - 2)])
        assert followed.reasons(1) == ["late"]
        record(sinks[kind], [AuditEvent(result="allowed", reason="newer", timestamp=now + 1),
                             AuditEvent(result="allowed", reason="newest", timestamp=now + 2)])
        assert followed.reasons(2) == ["newer", "newest"]
        assert followed.nothing_more(wait=1.5), "an event was printed twice"
        code, stderr = followed.stop(signum)
    finally:
        if followed.process.poll() is None:
            followed.process.kill()
    assert (code, stderr) == (0, "")


def test_follow_does_not_take_until_or_offset(tmp_path: Path) -> None:
    config = write_config(tmp_path, UPSTREAM_URL)
    for option in (["--until", "1h"], ["--offset", "5"]):
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "query", "--config", str(config),
                               "--follow", *option], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert (done.returncode, done.stderr) == (
            2, "audit query --follow: the newest events, then those that come: no --until or --offset\n")


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which a file created without a mode is world-readable."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_serve_creates_the_audit_file_and_its_directory_for_its_owner_only(tmp_path: Path, umask_022: None) -> None:
    port = free_port()
    audit_dir = tmp_path / "var" / "audit"
    config = write_config(tmp_path, UPSTREAM_URL, listen={"host": "127.0.0.1", "port": port},
                          audit={"sinks": [{"type": "sqlite", "path": str(audit_dir / "audit.db")},
                                           {"type": "jsonl", "path": str(audit_dir / "audit.jsonl")}]})
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port)
        assert httpx.post(f"http://127.0.0.1:{port}/mcp", json={}).status_code == 401  # an event for each sink
        modes = {p.name: mode(p) for p in audit_dir.iterdir()}
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert (mode(tmp_path / "var"), mode(audit_dir)) == (0o700, 0o700)
    assert modes == {"audit.db": 0o600, "audit.db-wal": 0o600, "audit.db-shm": 0o600, "audit.jsonl": 0o600}


SINK_FILES = [
    ("sqlite", lambda d: {"type": "sqlite", "path": str(d / "a" / "b" / "audit.db")}),
    ("jsonl", lambda d: {"type": "jsonl", "path": str(d / "a" / "b" / "audit.jsonl"), "rotate_mb": 0.001}),
]


@pytest.mark.parametrize("spec", [s for _, s in SINK_FILES], ids=[i for i, _ in SINK_FILES])
def test_every_file_and_directory_a_sink_creates_is_its_owners_only(
        tmp_path: Path, umask_022: None, spec: Any) -> None:
    for batch in range(3):  # the jsonl sink starts a new file past 1 KB, before a batch
        record(spec(tmp_path), events(5, start=T0 + 10 * batch))
    created = [tmp_path / "a", *sorted((tmp_path / "a").rglob("*"))]
    assert len(created) >= 3
    assert {str(p.relative_to(tmp_path)): mode(p) for p in created} == {
        str(p.relative_to(tmp_path)): 0o700 if p.is_dir() else 0o600 for p in created}


@pytest.mark.parametrize("spec", [s for _, s in SINK_FILES], ids=[i for i, _ in SINK_FILES])
def test_an_audit_file_open_to_every_user_is_left_as_it_is_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, spec: Any) -> None:
    path = Path(spec(tmp_path)["path"])
    path.parent.mkdir(parents=True)
    path.touch()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="gateway.audit"):
        record(spec(tmp_path), events(1))
    assert mode(path) == 0o644
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.audit"] == [
        f"audit file {path} is open to every user (mode 0644): chmod 600 it"]
