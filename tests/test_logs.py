"""The gateway's log lines, read from a real `mcp-gateway serve` and from the middleware around an in-process app:
one line per request, in both formats, with the caller, the target, the decision and what became of it;
uvicorn's own lines without terminal colours; one start-up summary saying what the gateway runs with, and no
secret."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.audit.event import AuditEvent
from gateway.audit.recording import request_fields
from gateway.auth.authenticator import Authenticator
from gateway.auth.keys import load_or_create_signing_key
from gateway.auth.secrets import hash_secret
from gateway.config import load_config
from gateway.logs import JsonFormatter, TextFormatter
from gateway.url_redaction import redact_url
from tests.conftest import pg_audit_table
from tests.harness import ROOT, ServerThread, build_server, deploy, free_port, wait_for_port, write_config
from tests.test_bad_input import BASE_HEADERS, modern

REQUEST_KEYS = ["audit_id", "user", "client", "method", "target", "result", "rule", "status", "duration_ms",
                "upstream"]
STARTUP_KEYS = ["version", "listen", "upstreams", "policy_file", "policy_version", "policy_engine", "policy_mode",
                "audit_sinks", "audit_on_sink_failure", "audit_durability", "auth", "sessions", "rate_limits",
                "tracing"]
# Each a secret the config holds (or, for the hash, what verifies one): none may reach a log line.
DSN_PASSWORD = "dsn-pa55word"
UPSTREAM_KEY = "upstream-s3cret"
INTROSPECTION_SECRET = "introspection-s3cret"
TRACING_KEY = "tracing-api-k3y"
STDIO_SECRET = "stdio-s3cret"
CLIENT_SECRET_HASH = hash_secret("client-s3cret")

# (method, params, with a token, what its request line says besides audit_id, duration_ms and upstream)
CALLS: list[tuple[str, dict[str, Any], bool, dict[str, Any]]] = [
    ("tools/call", {"name": "echo", "arguments": {"text": "x"}}, True,
     {"user": "alice", "client": "cli", "method": "tools/call", "target": "echo", "result": "allowed",
      "rule": "role:reader:tool", "status": 200}),
    ("tools/call", {"name": "delete_file", "arguments": {"path": "/etc/passwd"}}, True,
     {"user": "alice", "client": "cli", "method": "tools/call", "target": "delete_file", "result": "denied",
      "rule": "no-grant:tool", "status": 400}),
    ("resources/read", {"uri": "file:///srv/docs/readme"}, True,
     {"user": "alice", "client": "cli", "method": "resources/read", "target": "file:///srv/docs/readme",
      "result": "allowed", "rule": "role:reader:resource", "status": 200}),
    ("prompts/get", {"name": "summarize", "arguments": {"text": "two words"}}, True,
     {"user": "alice", "client": "cli", "method": "prompts/get", "target": "summarize", "result": "allowed",
      "rule": "role:reader:prompt", "status": 200}),
    ("tools/call", {"name": "echo", "arguments": {"text": "x"}}, False,  # refused before its body is read
     {"user": None, "client": None, "method": "POST", "target": None, "result": "auth_failed", "rule": "no_token",
      "status": 401}),
]

_VALUE = r'"(?:[^"\\]|\\.)*"|[^\s"]+'  # quoted as a JSON string, or bare
_TEXT_LINE = re.compile(rf"(\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z) ([A-Z]+) (\S.*?)((?: [a-z_]+=(?:{_VALUE}))*)")
_TEXT_PAIR = re.compile(rf" ([a-z_]+)=({_VALUE})")


def parse_text(line: str) -> tuple[str, str, dict[str, str]]:
    """(level, message, fields) of a text log line; a quoted value is read as the JSON string it is."""
    found = _TEXT_LINE.fullmatch(line)
    assert found is not None, f"not a text log line: {line!r}"
    pairs = {key: json.loads(value) if value.startswith('"') else value
             for key, value in _TEXT_PAIR.findall(found.group(4))}
    return found.group(2), found.group(3), pairs


def as_text(value: Any) -> str:
    """How a field's value reads in a text line."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(value)
    return str(value)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerThread]:
    server = ServerThread(build_server().streamable_http_app(stateless_http=True, json_response=True)).start()
    yield server
    server.stop()


def served_config(directory: Path, upstream_url: str, port: int, fmt: str, table: str) -> Path:
    """A config with a secret in every place one can be: a DSN's password, an upstream's header, a stdio
    upstream's arguments and environment, a registered client, introspection, the trace receiver's key."""
    stdio = {"name": "tools", "path": "/tools", "command": [sys.executable, "-c", "pass", STDIO_SECRET],
             "env": {"API_KEY": STDIO_SECRET}}
    return write_config(
        directory, None, public_url=f"http://127.0.0.1:{port}", log_format=fmt,
        listen={"host": "127.0.0.1", "port": free_port()},  # --port wins: the line says where it listens
        upstreams=[{"name": "demo", "path": "/mcp", "url": upstream_url, "headers": {"X-Api-Key": UPSTREAM_KEY}},
                   stdio],
        audit={"on_sink_failure": "buffer", "sinks": [
            {"type": "sqlite", "path": str(directory / "audit.db")},
            {"type": "postgres", "dsn": f"postgresql://root:{DSN_PASSWORD}@127.0.0.1/test?sslmode=disable",
             "table": table}]},
        auth={"clients": {"signing_key_file": str(directory / "key.pem"), "registered": [
                  {"client_id": "cli", "secret_hash": CLIENT_SECRET_HASH, "scopes": ["mcp:tools"]}]},
              "jwt": {"issuer": "https://issuer.example"},
              "introspection": {"url": "http://127.0.0.1:9/introspect", "client_id": "gateway",
                                "client_secret": INTROSPECTION_SECRET}},
        rate_limits=[{"match": {"any": True}, "limit": "1000/minute"}],
        tracing={"enabled": True, "sample_ratio": 0, "endpoint": f"http://127.0.0.1:{free_port()}/v1/traces",
                 "headers": {"x-api-key": TRACING_KEY}},
    )


def serve_and_call(directory: Path, upstream: ServerThread, fmt: str, table: str) -> tuple[list[str], Path, int]:
    """What `mcp-gateway serve` wrote to stderr from its start to its stop, with each of CALLS made in between."""
    port = free_port()
    config_path = served_config(directory, f"{upstream.url}/mcp", port, fmt, table)
    config = load_config(config_path)
    token = Authenticator(config, load_or_create_signing_key(config.auth.clients.signing_key_file)).issue_token(
        subject="alice", audience=config.resource_url(config.upstreams[0]), scopes=["mcp:tools"], client_id="cli")
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path),
                                "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for_port(port)
        for method, params, with_token, _ in CALLS:
            headers, body = modern(method, params)
            auth = {"Authorization": f"Bearer {token}"} if with_token else {}
            httpx.post(f"http://127.0.0.1:{port}/mcp", json=body, headers={**BASE_HEADERS, **headers, **auth})
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return stderr.splitlines(), config_path, port


@pytest.fixture(scope="module", params=["text", "json"])
def served(request: pytest.FixtureRequest, upstream: ServerThread,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str], Path, int]:
    directory = tmp_path_factory.mktemp(f"logs-{request.param}")
    with pg_audit_table() as table:  # its sink's table, in use while the gateway serves
        return (request.param, *serve_and_call(directory, upstream, request.param, table))


def records_of(fmt: str, lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(message, fields) of each line, in either format."""
    if fmt == "json":
        entries = [json.loads(line) for line in lines]
        return [(e["message"], {k: v for k, v in e.items() if k not in ("ts", "level", "logger", "message")})
                for e in entries]
    return [(message, fields) for _, message, fields in map(parse_text, lines)]


def assert_fields(fmt: str, fields: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        assert fields[key] == (value if fmt == "json" else as_text(value)), (key, fields)


def test_each_request_is_one_line_with_caller_target_decision_and_outcome(
        served: tuple[str, list[str], Path, int]) -> None:
    fmt, lines, config_path, _ = served
    requests = [fields for message, fields in records_of(fmt, lines) if message == "request"]
    assert len(requests) == len(CALLS), lines
    for fields, (_, _, _, expected) in zip(requests, CALLS, strict=True):
        assert list(fields)[:len(REQUEST_KEYS)] == REQUEST_KEYS
        assert_fields(fmt, fields, {**expected, "upstream": "demo"})
        assert re.fullmatch(r"[0-9a-f]{32}", fields["audit_id"])
        assert float(fields["duration_ms"]) > 0
    db = sqlite3.connect(config_path.parent / "audit.db")
    try:  # a line joins its audit event by the id
        assert [row[0] for row in db.execute("SELECT id FROM audit_events ORDER BY seq")] == \
            [fields["audit_id"] for fields in requests]
    finally:
        db.close()


def test_every_line_parses_and_none_carries_terminal_colours(served: tuple[str, list[str], Path, int]) -> None:
    fmt, lines, _, _ = served
    output = "\n".join(lines)
    assert "\x1b" not in output and "\\u001b" not in output and "color_message" not in output
    messages = [message for message, _ in records_of(fmt, lines)]  # each line, as JSON or as text
    assert any(m.startswith("Uvicorn running on") for m in messages), lines  # uvicorn's own lines, plain


def test_the_start_up_summary_is_one_line_saying_what_runs_and_no_secret(
        served: tuple[str, list[str], Path, int], upstream: ServerThread) -> None:
    fmt, lines, config_path, port = served
    config = load_config(config_path)
    pg_table = config.audit.sinks[1].table
    started = [fields for message, fields in records_of(fmt, lines) if message == "gateway started"]
    assert len(started) == 1, lines
    fields = started[0]
    assert list(fields) == STARTUP_KEYS
    assert_fields(fmt, fields, {
        "version": importlib.metadata.version("mcp-security-gateway"),
        "listen": f"127.0.0.1:{port}",
        "upstreams": [f"demo http /mcp -> {upstream.url}/mcp", "tools stdio /tools"],
        "policy_file": str(config_path.parent / "policy.yaml"),
        "policy_version": config.policy.version,
        "policy_engine": "yaml",
        "policy_mode": "enforce",
        "audit_sinks": [f"sqlite {config_path.parent / 'audit.db'}",
                        f"postgres postgresql://***@127.0.0.1/test table {pg_table}"],
        "audit_on_sink_failure": "buffer",
        "audit_durability": "written",
        "auth": ["gateway-issued", "jwt https://issuer.example", "introspection http://127.0.0.1:9/introspect"],
        "sessions": "memory",
        "rate_limits": 1,
        "tracing": "on",
    })
    key_material = [line for line in (config_path.parent / "key.pem").read_text().splitlines()
                    if not line.startswith("-----")]
    for secret in [DSN_PASSWORD, UPSTREAM_KEY, INTROSPECTION_SECRET, TRACING_KEY, STDIO_SECRET, CLIENT_SECRET_HASH,
                   *key_material]:
        assert not [line for line in lines if secret in line], secret


# (a URL or DSN a config holds, how the start-up line and an audit sink's messages show it). A `/`, `?`, `#` or `@`
# left in a password (not percent-encoded) ends its URL early for a URL parser, which takes the rest for a path,
# query or fragment: everything from `://` to the last `@` is hidden all the same.
REDACTED = [
    ("postgresql://127.0.0.1/test", "postgresql://127.0.0.1/test"),
    ("postgresql://root:S3CR3T@127.0.0.1:5432/test?sslmode=disable", "postgresql://***@127.0.0.1:5432/test"),
    ("postgresql://S3CR3T@127.0.0.1/test", "postgresql://***@127.0.0.1/test"),
    ("postgresql://u:S3/CR3T@db.example/audit", "postgresql://***@db.example/audit"),
    ("postgresql://u:S3?CR3T@db.example/audit", "postgresql://***@db.example/audit"),
    ("postgresql://u:S3#CR3T@db.example/audit", "postgresql://***@db.example/audit"),
    ("postgresql://u:S3@CR3T@db.example:5433/audit", "postgresql://***@db.example:5433/audit"),
    ("postgresql://u:S3/?#@CR3T@db.example/audit?sslmode=require#S3CR3T", "postgresql://***@db.example/audit"),
    ("postgresql://u:S3%2FCR3T@db.example/audit", "postgresql://***@db.example/audit"),
    ("postgresql://u:S3CR3T@a.example,b.example:5433/audit", "postgresql://***@a.example,b.example:5433/audit"),
    ("postgresql:///audit", "postgresql:///audit"),
    ("redis://:S3CR3T@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("https://issuer.example/tenant?key=S3CR3T#S3CR3T", "https://issuer.example/tenant"),
    ("host=127.0.0.1 password=S3CR3T", "***"),
    ("host=127.0.0.1 password=S3://CR3T@x", "***"),
    ("postgresql://u:S3CR3T@[::1/audit", "***"),
]


@pytest.mark.parametrize(("url", "shown"), REDACTED, ids=[url for url, _ in REDACTED])
def test_a_url_is_shown_without_anything_before_its_last_at_sign_nor_its_query(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "S3" not in shown and "CR3T" not in shown


def test_the_middleware_in_process_logs_one_summary_at_startup_and_the_same_request_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    deployment = deploy("middleware", tmp_path, stateless=True, json_response=True)
    try:
        started = [r for r in caplog.records if r.getMessage() == "gateway started"]
        assert len(started) == 1  # on the ASGI lifespan's startup, before any request
        headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "x"}})
        httpx.post(deployment.url, json=body, headers={
            **BASE_HEADERS, **headers, "Authorization": f"Bearer {deployment.token()}"})
    finally:
        deployment.stop()
    assert [r for r in caplog.records if r.getMessage() == "gateway started"] == started
    request = next(r for r in caplog.records if r.getMessage() == "request")
    expected = {"user": "alice", "client": None, "method": "tools/call", "target": "echo", "result": "allowed",
                "rule": "role:reader:tool", "status": 200, "upstream": "demo"}
    _, _, text_fields = parse_text(TextFormatter().format(request))
    assert list(text_fields)[:len(REQUEST_KEYS)] == REQUEST_KEYS
    assert_fields("text", text_fields, expected)
    entry = json.loads(JsonFormatter().format(request))
    assert_fields("json", entry, expected)
    _, _, summary = parse_text(TextFormatter().format(started[0]))
    assert summary["listen"] == "-"  # the host app's server listens, wherever it was told to
    assert summary["upstreams"] == "demo in-process /mcp"


def test_each_worker_of_serve_workers_writes_its_start_up_line_and_its_requests(tmp_path: Path) -> None:
    # A worker is a fresh interpreter: the parent's log set-up does not reach it.
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}/mcp", public_url=f"http://127.0.0.1:{port}",
                          log_format="text", sessions={"backend": "redis", "url": "redis://127.0.0.1:6379/0"})
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port",
                                str(port), "--workers", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    stderr = process.stderr
    assert stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in stderr), daemon=True)
    reader.start()

    def started() -> list[dict[str, str]]:
        return [fields for _, message, fields in map(parse_text, list(lines)) if message == "gateway started"]

    try:
        deadline = time.monotonic() + 20
        while len(started()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "x"}})
        for _ in range(10):
            httpx.post(f"http://127.0.0.1:{port}/mcp", json=body, headers={**BASE_HEADERS, **headers})
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
        reader.join(10)
    assert [fields["listen"] for fields in started()] == [f"127.0.0.1:{port}"] * 2, lines
    requests = [fields for _, message, fields in map(parse_text, lines) if message == "request"]
    assert [fields["result"] for fields in requests] == ["auth_failed"] * 10, lines


# (what the event says besides its result, what the request line adds after its fixed fields)
OPTIONAL_FIELDS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"reason": "role:reader:tool", "rule": "role:reader:tool"}, {}),
    ({"reason": "upstream:502", "rule": "role:reader:tool"}, {"reason": "upstream:502"}),
    ({"reason": "role:reader:tool", "rule": "role:reader:tool", "would_deny": "no-grant:tool"},
     {"would_deny": "no-grant:tool"}),
]


@pytest.mark.parametrize(("event", "added"), OPTIONAL_FIELDS)
def test_the_request_line_adds_a_reason_only_when_it_says_more_than_the_rule(
        event: dict[str, Any], added: dict[str, Any]) -> None:
    fields = request_fields(AuditEvent(result="allowed", operation="tools/call", tool_executed="echo", **event))
    assert list(fields) == [*REQUEST_KEYS, "source_ip", *added]
    assert {key: fields[key] for key in added} == added


def record(message: str, error: BaseException | None = None, **extra: Any) -> logging.LogRecord:
    exc_info = None if error is None else (type(error), error, error.__traceback__)
    return logging.getLogger("gateway.test").makeRecord("gateway.test", logging.WARNING, __file__, 1, message, (),
                                                        exc_info, extra=extra)


# A record of its own, as a caller's text could try to write one after a line break.
FORGED = "2026-12-03T16:40:00.000Z INFO request user=mallory result=allowed"

# (message, extra fields, an exception logged with it, how the text output reads after its timestamp)
TEXT_CASES: list[tuple[str, dict[str, Any], BaseException | None, str]] = [
    ("plain", {}, None, "WARNING plain"),
    ("fields", {"n": 3, "ratio": 1.5, "on": True, "none": None}, None, "WARNING fields n=3 ratio=1.5 on=true none=-"),
    ("quoted", {"text": "two words", "empty": "", "eq": "a=b", "quote": 'say "hi"'}, None,
     r'WARNING quoted text="two words" empty="" eq="a=b" quote="say \"hi\""'),
    ("a list", {"items": ["a b", "c"]}, None, 'WARNING a list items="a b, c"'),
    (f"forged\n{FORGED}", {"tool": f"x\n{FORGED}"}, None,
     rf'WARNING forged\n{FORGED} tool="x\n{FORGED}"'),
    ("colours", {"tool": "\x1b[31mred", "c1": "\x9b31m"}, None, r'WARNING colours tool="\u001b[31mred" c1="\u009b31m"'),
    ("controls \x7f\x85\x9b\u2028\u2029", {"delete": "a\x7f", "c1": "\x85\x9b2J", "lines": "a\u2028b\u2029"}, None,
     r'WARNING controls \u007f\u0085\u009b\u2028\u2029 delete="a\u007f" c1="\u0085\u009b2J" lines="a\u2028b\u2029"'),
    ("uvicorn's", {"color_message": "Started \x1b[36m%d\x1b[0m"}, None, "WARNING uvicorn's"),
    ("failed", {}, ValueError(f"bad\n{FORGED}\r\x1b[2J\x7f\x9b\u2028"),
     f"WARNING failed\n    ValueError: bad\n    {FORGED}" r"\r\u001b[2J\u007f\u009b\u2028"),
]


@pytest.mark.parametrize(("message", "extra", "error", "expected"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_lines_quote_what_needs_it_and_escape_every_control_character(
        message: str, extra: dict[str, Any], error: BaseException | None, expected: str) -> None:
    text = TextFormatter().format(record(message, error, **extra))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text.split(" ", 1)[0])
    assert text.split(" ", 1)[1] == expected
    line = JsonFormatter().format(record(message, error, **extra))
    entry = json.loads(line)
    assert "color_message" not in entry
    assert entry["message"] == message and {k: entry[k] for k in extra if k != "color_message"} == \
        {k: v for k, v in extra.items() if k != "color_message"}
    # Neither format writes a character a terminal acts on (ESC, DEL, C1 such as CSI) or a reader splits lines at
    # (U+2028, U+2029), nor a line that starts like a record: JSON is one line, text continues indented.
    for output in (text, line):
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", output), output
    assert "\n" not in line
    assert [more for more in text.split("\n")[1:] if not more.startswith("    ")] == []


def test_an_answer_cut_off_on_purpose_is_one_line_of_the_gateways_and_no_uvicorn_traceback(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import logs
    from gateway.inspect import AnswerWithheld

    uvicorn_logger, root = logging.getLogger("uvicorn"), logging.getLogger()
    monkeypatch.setattr(uvicorn_logger, "handlers", [])  # as serve leaves it (log_config=None): its lines reach ours
    monkeypatch.setattr(uvicorn_logger, "propagate", True)
    monkeypatch.setattr(root, "handlers", [])  # configure's handler, writing to this test's stderr, goes with it
    level = root.level
    try:
        logs.configure("INFO", "text")
        server = logging.getLogger("uvicorn.error")
        server.error("Exception in ASGI application\n", exc_info=AnswerWithheld("the answer was cut off: why"))
        server.error("Exception in ASGI application\n", exc_info=RuntimeError("a real failure"))
    finally:
        root.setLevel(level)
    written = capsys.readouterr().err
    assert "AnswerWithheld" not in written and written.count("Exception in ASGI application") == 1
    assert "RuntimeError: a real failure" in written
