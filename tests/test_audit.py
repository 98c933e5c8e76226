"""The audit trail against real sinks: SQLite and JSONL files and the PostgreSQL server on 127.0.0.1:5432.

Exactly one event per request, in every sink; nothing lost under load, when a
sink fails, or at shutdown; tampering found by `audit verify`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import create_app
from gateway.audit.sinks import AuditQuery, open_sink
from gateway.config import AuditSink
from tests.harness import ROOT, Deployment, ServerThread, deploy, free_port, wait_for_port, write_config
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_upstream_failures import ScriptedUpstream

DSN = "postgresql://127.0.0.1/test"


@pytest.fixture
def pg_table() -> Iterator[str]:
    table = f"audit_{uuid.uuid4().hex[:10]}"
    yield table

    async def drop() -> None:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.execute(f"DROP TABLE IF EXISTS {table}_away")
        finally:
            await conn.close()

    asyncio.run(drop())


def sinks(tmp_path: Path, table: str) -> list[dict[str, Any]]:
    return [{"type": "sqlite", "path": str(tmp_path / "audit.db")},
            {"type": "jsonl", "path": str(tmp_path / "audit.jsonl")},
            {"type": "postgres", "dsn": DSN, "table": table}]


def read_all(deployment: Deployment, sink_index: int) -> list[dict[str, Any]]:
    """Every event of one sink, through that sink's own query path."""
    spec = deployment.runtime.config.audit.sinks[sink_index]
    deployment.gateway.call(deployment.runtime.audit.flush())

    async def read() -> list[dict[str, Any]]:
        reader = open_sink(spec)
        try:
            return await reader.query(AuditQuery(limit=1_000_000))
        finally:
            await reader.close()

    return asyncio.run(read())


def verify(deployment: Deployment) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify", "--config",
                           str(deployment.config_path)], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.splitlines()


def call(url: str, token: str | None, tool: str = "echo", **headers: str) -> httpx.Response:
    h, body = modern("tools/call", {"name": tool, "arguments": {"text": "x", "api_key": "k-123"}})
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    h.update({name.replace("_", "-"): value for name, value in headers.items()})
    return httpx.post(url, headers={**BASE_HEADERS, **h, **auth}, json=body)


def test_every_result_kind_is_exactly_one_event_with_its_fields_in_every_sink(tmp_path: Path, pg_table: str) -> None:
    deployment = deploy("proxy", tmp_path, audit={"sinks": sinks(tmp_path, pg_table)})
    dead = ScriptedUpstream(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    try:
        token = deployment.token()
        assert call(deployment.url, token).status_code == 200
        assert call(deployment.url, token, "delete_file").status_code == 400
        assert call(deployment.url, None).status_code == 401
        assert call(deployment.url, token, Mcp_Name="other").status_code == 400
        expected = [("allowed", "echo", 200, "alice"), ("denied", "delete_file", 400, "alice"),
                    ("auth_failed", None, 401, None), ("invalid_request", None, 400, "alice")]
        per_sink = [read_all(deployment, i) for i in range(3)]
        for events in per_sink:
            assert [(e["result"], e["tool_executed"], e["status"], e["user_id"]) for e in events] == expected
            allowed = events[0]
            assert allowed["reason"] == "role:reader:tool" and allowed["operation"] == "tools/call"
            assert allowed["upstream"] == "demo" and allowed["source_ip"] == "127.0.0.1"
            assert allowed["protocol_version"] == "2026-07-28" and allowed["request_id"] == "7"
            assert allowed["roles"] == ["reader"] and allowed["policy_version"]
            assert json.loads(allowed["arguments"]) == {"text": "x", "api_key": "[REDACTED]"}
            assert allowed["duration_ms"] > 0 and abs(allowed["timestamp"] - time.time()) < 60
            assert events[2]["reason"] == "no_token"
            assert events[3]["reason"].startswith("header_mismatch:")
        assert per_sink[0] == per_sink[1] == per_sink[2], "the sinks disagree"
        assert len({e["id"] for e in per_sink[0]}) == 4
    finally:
        deployment.stop()

    for url, result, reason in ((f"http://127.0.0.1:{free_port()}/mcp", "upstream_error", "upstream:connect"),
                                (f"http://127.0.0.1:{dead.port}/mcp", "error", "status:500")):
        other = tmp_path / result
        other.mkdir()
        port = free_port()
        app = create_app(write_config(other, url, public_url=f"http://127.0.0.1:{port}"))
        server = ServerThread(app, port).start()
        try:
            config = app.runtime.config
            token = app.runtime.authenticator.issue_token(subject="alice", audience=config.resource_url(
                config.upstreams[0]), scopes=["mcp:tools"])
            call(f"{server.url}/mcp", token)
            server.call(app.runtime.audit.flush())
            db = sqlite3.connect(config.audit.sinks[0].path)
            rows = db.execute("SELECT result, reason FROM audit_events").fetchall()
            db.close()
            assert rows == [(result, reason)]
        finally:
            server.stop()
    dead.close()


async def _load(url: str, tokens: dict[str, str], total: int, concurrency: int = 32) -> dict[int, int]:
    statuses: dict[int, int] = {}
    kinds = [("echo", "good"), ("delete_file", "good"), ("echo", "none"), ("echo", "bad")]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            tool, who = kinds[i % len(kinds)]
            headers, body = modern("tools/call", {"name": tool, "arguments": {"text": str(i)}})
            if who != "none":
                headers["Authorization"] = f"Bearer {tokens[who]}"
            response = await client.post(url, headers={**BASE_HEADERS, **headers}, json=body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def test_5000_mixed_requests_give_exactly_5000_events_in_each_sink(tmp_path: Path, pg_table: str) -> None:
    deployment = deploy("proxy", tmp_path, stateless=True, json_response=True,
                        audit={"sinks": sinks(tmp_path, pg_table), "batch_size": 200})
    try:
        tokens = {"good": deployment.token(), "bad": "x.y.z"}
        statuses = asyncio.run(_load(deployment.url, tokens, 5000))
        assert statuses == {200: 1250, 400: 1250, 401: 2500}
        for index in range(3):
            events = read_all(deployment, index)
            assert len(events) == 5000 and len({e["id"] for e in events}) == 5000
            counts = {r: sum(e["result"] == r for e in events) for r in ("allowed", "denied", "auth_failed")}
            assert counts == {"allowed": 1250, "denied": 1250, "auth_failed": 2500}
        assert all(line.endswith("5000 events, chain intact") for line in verify(deployment))
    finally:
        deployment.stop()


def test_a_postgres_outage_fails_closed_and_loses_nothing(tmp_path: Path, pg_table: str) -> None:
    deployment = deploy("proxy", tmp_path, audit={"sinks": sinks(tmp_path, pg_table)[::2],
                                                  "on_sink_failure": "fail_closed"})
    token = deployment.token()

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    try:
        assert call(deployment.url, token).status_code == 200
        deployment.gateway.call(deployment.runtime.audit.flush())
        # A cut connection: the sink reconnects on its next batch; nothing is refused for long.
        asyncio.run(sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        f"WHERE datname = 'test' AND pid <> pg_backend_pid() AND query ILIKE '%{pg_table}%'"))
        # A sustained outage: the table is gone while requests keep coming.
        asyncio.run(sql(f"ALTER TABLE {pg_table} RENAME TO {pg_table}_away"))
        statuses = []
        for _ in range(20):
            statuses.append(call(deployment.url, token).status_code)
            time.sleep(0.05)
        assert 503 in statuses, "requests were served while the audit trail could not record them"
        ready = httpx.get(f"{deployment.gateway.url}/readyz")
        assert ready.status_code == 503 and ready.json()["failing_sinks"] == [f"postgres:{pg_table}"]
        asyncio.run(sql(f"ALTER TABLE {pg_table}_away RENAME TO {pg_table}"))
        probes = []
        deadline = time.monotonic() + 15
        while not probes or probes[-1] != 200:
            assert time.monotonic() < deadline, "never recovered"
            probes.append(call(deployment.url, token).status_code)
            time.sleep(0.1)
        made = 1 + len(statuses) + len(probes)
        refused = statuses.count(503) + probes.count(503)
        sqlite_events = read_all(deployment, 0)
        pg_events = read_all(deployment, 1)
        assert sqlite_events == pg_events, "the sinks disagree after the outage"
        assert len(pg_events) == made, "a request went unrecorded"
        assert [e["reason"] for e in pg_events].count("audit_unavailable") == refused
        assert all(line.endswith("chain intact") for line in verify(deployment))
    finally:
        deployment.stop()


def test_an_unwritable_file_buffers_then_recovers_with_nothing_lost(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    deployment = deploy("proxy", tmp_path, audit={"sinks": [{"type": "jsonl", "path": str(path)}],
                                                  "on_sink_failure": "buffer"})
    token = deployment.token()
    try:
        assert call(deployment.url, token).status_code == 200
        deployment.gateway.call(deployment.runtime.audit.flush())
        # Root ignores file modes, so "unwritable" is a directory standing where the file was.
        path.rename(tmp_path / "kept.jsonl")
        path.mkdir()
        statuses = [call(deployment.url, token).status_code for _ in range(10)]
        assert statuses == [200] * 10  # buffer mode keeps serving
        time.sleep(1)
        assert deployment.runtime.audit.depth == 10
        metrics = httpx.get(f"{deployment.gateway.url}/metrics").text
        assert "mcp_gateway_audit_buffered_events 10.0" in metrics
        path.rmdir()
        (tmp_path / "kept.jsonl").rename(path)
        deployment.gateway.call(deployment.runtime.audit.flush(), timeout=15)
        lines = path.read_text().splitlines()
        assert len(lines) == 11
        assert all(line.endswith("chain intact") for line in verify(deployment))
    finally:
        deployment.stop()


def _tamper_sqlite(db_path: Path, how: str) -> None:
    db = sqlite3.connect(db_path)
    if how == "edit":
        db.execute("UPDATE audit_events SET result = 'allowed' WHERE seq = 2")
    elif how == "edit-record":
        row = db.execute("SELECT record FROM audit_events WHERE seq = 2").fetchone()
        db.execute("UPDATE audit_events SET record = ? WHERE seq = 2", (row[0].replace("denied", "allowed"),))
    elif how == "delete":
        db.execute("DELETE FROM audit_events WHERE seq = 2")
    elif how == "reorder":
        columns = [r[1] for r in db.execute("PRAGMA table_info(audit_events)") if r[1] not in ("seq", "id")]
        a = db.execute(f"SELECT {', '.join(columns)} FROM audit_events WHERE seq = 2").fetchone()
        b = db.execute(f"SELECT {', '.join(columns)} FROM audit_events WHERE seq = 3").fetchone()
        sets = ", ".join(f"{c} = ?" for c in columns)
        db.execute(f"UPDATE audit_events SET {sets} WHERE seq = 2", b)
        db.execute(f"UPDATE audit_events SET {sets} WHERE seq = 3", a)
    db.commit()
    db.close()


def _tamper_jsonl(path: Path, how: str) -> None:
    lines = path.read_text().splitlines()
    if how in ("edit", "edit-record"):
        lines[1] = lines[1].replace('"denied"', '"allowed"')
    elif how == "delete":
        del lines[1]
    elif how == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")


async def _tamper_postgres(table: str, how: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        if how == "edit":
            await conn.execute(f"UPDATE {table} SET result = 'allowed' WHERE seq = 2")
        elif how == "edit-record":
            await conn.execute(f"UPDATE {table} SET record = replace(record, 'denied', 'allowed') WHERE seq = 2")
        elif how == "delete":
            await conn.execute(f"DELETE FROM {table} WHERE seq = 2")
        elif how == "reorder":
            await conn.execute(f"UPDATE {table} SET seq = -2 WHERE seq = 2")
            await conn.execute(f"UPDATE {table} SET seq = 2 WHERE seq = 3")
            await conn.execute(f"UPDATE {table} SET seq = 3 WHERE seq = -2")
    finally:
        await conn.close()


@pytest.mark.parametrize("how", ["edit", "edit-record", "delete", "reorder"])
def test_audit_verify_finds_an_edited_deleted_or_reordered_event(tmp_path: Path, pg_table: str, how: str) -> None:
    deployment = deploy("proxy", tmp_path, audit={"sinks": sinks(tmp_path, pg_table)})
    try:
        token = deployment.token()
        for tool in ("echo", "delete_file", "echo", "search"):
            call(deployment.url, token, tool)
        deployment.gateway.call(deployment.runtime.audit.flush())
        assert verify(deployment) == [
            f"sqlite:{tmp_path / 'audit.db'}: OK, 4 events, chain intact",
            f"jsonl:{tmp_path / 'audit.jsonl'}: OK, 4 events, chain intact",
            f"postgres:{pg_table}: OK, 4 events, chain intact",
        ]
    finally:
        deployment.stop()
    _tamper_sqlite(tmp_path / "audit.db", how)
    _tamper_jsonl(tmp_path / "audit.jsonl", how)
    asyncio.run(_tamper_postgres(pg_table, how))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify", "--config",
                           str(deployment.config_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(": BROKEN at event 2 " in line for line in lines), lines


def test_metrics_parse_and_stay_bounded_under_10000_distinct_unknown_tools(tmp_path: Path) -> None:
    # A real `mcp-gateway serve` process: the load generator does not share an interpreter with the gateway.
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}/mcp", public_url=f"http://127.0.0.1:{port}",
                          listen={"host": "127.0.0.1", "port": port})
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port)
        token = subprocess.run([sys.executable, "-m", "gateway.cli", "issue-token", "--config", str(config),
                                "--subject", "alice", "--scope", "mcp:tools"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout.strip()
        call(f"{base}/mcp", token)

        def series() -> int:
            return sum(len(f.samples) for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text))

        async def flood() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                sem = asyncio.Semaphore(32)

                async def one(i: int) -> None:
                    async with sem:
                        headers, body = modern("tools/call", {"name": f"probe_{i}", "arguments": {}})
                        await client.post(f"{base}/mcp", json=body, headers={
                            **BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"})

                await asyncio.gather(*(one(i) for i in range(10_000)))

        before = series()
        asyncio.run(flood())
        after = series()
        assert after - before < 40, f"{after - before} new series for 10,000 distinct tool names"
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
        decided = {tuple(sorted(s.labels.items())): s.value for s in families["mcp_gateway_decisions"].samples
                   if s.name.endswith("_total")}
        assert decided[(("reason", "no-grant:tool"), ("result", "denied"), ("tool", "other"))] == 10_000
        assert decided[(("reason", "role:reader:tool"), ("result", "allowed"), ("tool", "echo"))] == 1
        for name in ("mcp_gateway_requests", "mcp_gateway_auth_attempts", "mcp_gateway_token_cache",
                     "mcp_gateway_audit_events_written", "mcp_gateway_upstream_duration_seconds",
                     "mcp_gateway_overhead_duration_seconds", "mcp_gateway_audit_queue_depth"):
            assert name in families, name
    finally:
        process.terminate()
        process.wait(30)


def test_admin_audit_needs_the_read_scope(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path)
    try:
        call(deployment.url, deployment.token(), "delete_file")
        admin = f"{deployment.gateway.url}/admin/audit"
        assert httpx.get(admin).status_code == 401
        refused = httpx.get(admin, headers={"Authorization": f"Bearer {deployment.token()}"})
        assert refused.status_code == 403
        assert 'error="insufficient_scope", scope="audit:read"' in refused.headers["www-authenticate"]
        reader = deployment.runtime.authenticator.issue_token(
            subject="auditor", audience=f"{deployment.runtime.config.public_url}/admin", scopes=["audit:read"])
        deployment.gateway.call(deployment.runtime.audit.flush())
        found = httpx.get(admin, params={"result": "denied", "since": "1h", "tool": "delete_file"},
                          headers={"Authorization": f"Bearer {reader}"})
        assert found.status_code == 200, found.text
        assert [(e["user_id"], e["tool_executed"]) for e in found.json()["events"]] == [("alice", "delete_file")]
        bad = httpx.get(admin, params={"since": "yesterday"}, headers={"Authorization": f"Bearer {reader}"})
        assert bad.status_code == 400 and "is not a time" in bad.json()["error"]["message"]
        accesses = [e["result"] for e in deployment.audit_events() if e["operation"] == "admin/audit"]
        assert accesses == ["auth_failed", "denied", "allowed", "invalid_request"]
    finally:
        deployment.stop()


def test_sigterm_flushes_every_event_and_logs_are_json_with_the_audit_id(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}/mcp", public_url=f"http://127.0.0.1:{port}",
                          listen={"host": "127.0.0.1", "port": port},
                          audit={"sinks": [{"type": "sqlite", "path": str(tmp_path / "audit.db")}],
                                 "batch_size": 100000})
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port)
        statuses = [call(f"http://127.0.0.1:{port}/mcp", None).status_code for _ in range(200)]
        assert statuses == [401] * 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    db = sqlite3.connect(tmp_path / "audit.db")
    ids = {row[0] for row in db.execute("SELECT id FROM audit_events")}
    db.close()
    assert len(ids) == 200
    logged = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    requests = [entry for entry in logged if entry["message"] == "request"]
    assert {entry["audit_id"] for entry in requests} == ids
    assert all(entry["level"] == "INFO" and entry["result"] == "auth_failed" for entry in requests)


def test_audit_query_prints_a_table(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path)
    try:
        call(deployment.url, deployment.token(), "delete_file")
        deployment.gateway.call(deployment.runtime.audit.flush())
    finally:
        deployment.stop()
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "query", "--config",
                           str(deployment.config_path), "--since", "1h", "--user", "alice", "--result", "denied"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    header, row, summary = done.stdout.splitlines()
    assert header.split() == ["time", "result", "operation", "target", "user", "client", "reason", "status"]
    assert row.split()[2:6] == ["denied", "tools/call", "delete_file", "alice"]
    assert summary.startswith("1 event(s) from sqlite:")
    as_json = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "query", "--config",
                              str(deployment.config_path), "--format", "json", "--tool", "echo"],
                             capture_output=True, text=True, cwd=ROOT)
    assert json.loads(as_json.stdout) == []


def test_the_jsonl_sink_rotates_and_verifies_across_files(tmp_path: Path) -> None:
    spec = AuditSink(type="jsonl", path=tmp_path / "a.jsonl", rotate_mb=0.001)  # about 1 KB a file

    async def write() -> None:
        from gateway.audit.event import AuditEvent

        sink = open_sink(spec)
        await sink.open()
        for i in range(20):
            await sink.write([AuditEvent(result="allowed", reason=f"r{i}")])
        await sink.close()
        reopened = open_sink(spec)
        await reopened.open()
        await reopened.write([AuditEvent(result="denied", reason="after restart")])
        report = await reopened.verify()
        assert report.ok and report.count == 21
        assert len(await reopened.query(AuditQuery(result="denied"))) == 1

    asyncio.run(write())
    assert len(list(tmp_path.glob("a.jsonl.*"))) >= 2
    shutil.rmtree(tmp_path)
    os.makedirs(tmp_path)


def test_two_workers_share_the_sinks_and_the_metrics(tmp_path: Path, pg_table: str) -> None:
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}/mcp", public_url=f"http://127.0.0.1:{port}",
                          listen={"host": "127.0.0.1", "port": port}, audit={"sinks": sinks(tmp_path, pg_table)[::2]})
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
                                "--workers", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        time.sleep(1.5)  # both workers up
        for _ in range(300):  # a new connection each, so both workers can take some
            assert call(f"http://127.0.0.1:{port}/mcp", None).status_code == 401
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        total = sum(s.value for s in families["mcp_gateway_requests"].samples if s.name.endswith("_total"))
        assert total == 300, "the workers' counts were not added up"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    db = sqlite3.connect(tmp_path / "audit.db")
    chains = dict(db.execute("SELECT chain, count(*) FROM audit_events GROUP BY chain").fetchall())
    db.close()
    # One chain per worker that took connections (the kernel decides how many did; usually both).
    assert sum(chains.values()) == 300 and 1 <= len(chains) <= 2, chains
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout
    assert all(line.endswith("300 events, chain intact") for line in done.stdout.splitlines())


def test_deleting_an_earlier_writers_events_is_found_through_the_next_chains_anchor(tmp_path: Path) -> None:
    from gateway.audit.event import AuditEvent

    spec = AuditSink(type="sqlite", path=tmp_path / "a.db")

    async def two_lifetimes() -> None:
        for chain in ("first-run", "second-run"):
            sink = open_sink(spec)
            await sink.open()
            events = [AuditEvent(result="allowed", reason=str(i), chain=chain) for i in range(3)]
            await sink.write(events)
            await sink.close()

    asyncio.run(two_lifetimes())

    async def verify_now() -> Any:
        return await open_sink(spec).verify()

    assert asyncio.run(verify_now()).ok
    db = sqlite3.connect(tmp_path / "a.db")
    db.execute("DELETE FROM audit_events WHERE chain = 'first-run'")
    db.commit()
    db.close()
    report = asyncio.run(verify_now())
    assert (report.ok, report.broken_at) == (False, 1)
    assert "earlier events were deleted" in (report.why or "")
