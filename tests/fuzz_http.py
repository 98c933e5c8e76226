"""The HTTP-level fuzzer: generated requests against a running `mcp-gateway serve` in front of the demo server.

For every request: never a crash of the gateway (the plain-text 500 its server sends when the app raises, or an
audit event whose reason is an exception), never a traceback, and an error answer is a JSON-RPC error with a
code from the catalogue. (A 500 the upstream itself answers with a JSON-RPC error passes through as the
upstream's.) At the end: exactly one audit event per request to the MCP endpoint, and every message the upstream
received was recorded as allowed for what it is (its method, id and tool), so nothing reached it undecided.
Bodies are never JSON arrays at the top (a batch is one event per member; batches are fuzzed in tests/fuzzing.py).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway import errors
from gateway.auth.authenticator import Authenticator
from gateway.auth.keys import load_or_create_signing_key
from gateway.config import load_config
from tests import fuzzing
from tests.harness import MODERN, ROOT, Recorder, ServerThread, free_port, wait_for_port, write_config

sys.path.insert(0, str(ROOT / "examples"))
from demo_server import build_server

CODES = {r.code for r in errors.CATALOGUE} | {-32602, -32601, -32600, -32700}  # the upstream's own as well
TOOLS = ["echo", "search", "delete_file", "get_weather", "ask_llm", "nope", "ech\u043e"]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes]:
    """(HTTP method, path, headers, body)."""
    method = draw(st.sampled_from(["POST"] * 8 + ["GET", "DELETE", "PUT", "OPTIONS"]))
    path = draw(st.sampled_from(["/mcp"] * 10 + ["/mcp/", "/MCP", "/mcp/../mcp", "/x", "/admin/audit",
                                                   "/.well-known/oauth-protected-resource/mcp"]))
    era = draw(st.sampled_from(["modern", "legacy", "none"]))
    tool = draw(st.sampled_from(["echo", "echo", "search", *TOOLS]))
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": draw(st.integers(0, 10**6)),
                               "method": draw(st.sampled_from(["tools/call"] * 4 + fuzzing.METHODS)),
                               "params": {"name": tool, "arguments": {"text": "x", "path": "/etc/passwd"}}}
    content_type = draw(st.sampled_from(["application/json"] * 6 + ["text/plain", "", "application/json;x"]))
    headers = {"Content-Type": content_type, "Accept": "application/json, text/event-stream"}
    if era == "modern":
        message["params"]["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN,
                                      "io.modelcontextprotocol/clientCapabilities": {}}
        headers.update({"MCP-Protocol-Version": MODERN, "Mcp-Method": message["method"],
                        "Mcp-Name": tool if tool.isascii() else "x"})
    elif era == "legacy":
        headers["MCP-Protocol-Version"] = draw(st.sampled_from(["2025-11-25", "2025-03-26", "2024-11-05"]))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["Mcp-Session-Id", "Mcp-Name", "Origin", "Connection", "X-Forwarded-For",
                                     "Mcp_Session_Id", "Expect", "Last-Event-ID", "Mcp-Param-Region"]))
        headers[name] = draw(st.sampled_from(["a", "http://evil.example", "close, Mcp-Name", "100-continue", "",
                                              "=?base64?ZWNobw==?="]))
    body = draw(st.one_of(st.just(json.dumps(message).encode()), st.just(json.dumps(message).encode()),
                          fuzzing.bodies()))
    if body.lstrip().startswith(b"["):
        body = body.lstrip()[1:]  # no batches here: see the docstring
    return method, path, headers, body


def fuzz_serve(count: int, *, derandomize: bool = False) -> bool:
    """Run `count` generated requests against `mcp-gateway serve`; print the figures; True when all held.
    `derandomize`: the same requests every run (the bounded run in `make test`)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        return _fuzz(Path(scratch), count, derandomize)


def _fuzz(directory: Path, count: int, derandomize: bool) -> bool:
    recorder = Recorder(build_server().streamable_http_app(stateless_http=True, json_response=True))
    upstream = ServerThread(recorder).start()
    port = free_port()
    config_path = write_config(directory, f"{upstream.url}/mcp", public_url=f"http://127.0.0.1:{port}",
                               listen={"host": "127.0.0.1", "port": port}, log_level="WARNING")
    config = load_config(config_path)
    authenticator = Authenticator(config, load_or_create_signing_key(config.auth.clients.signing_key_file))
    audience = config.resource_url(config.upstreams[0])
    tokens = [authenticator.issue_token(subject="alice", audience=audience, scopes=["mcp:tools"]),
              authenticator.issue_token(subject="olga", audience=audience, claims={"groups": ["ops"]}),
              authenticator.issue_token(subject="mallory", audience="http://elsewhere/mcp", scopes=["mcp:tools"]),
              "not-a-token", ""]
    log = (directory / "gateway.log").open("w")
    gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)],
                               cwd=ROOT, stdout=log, stderr=log)
    sent = 0
    to_mcp = 0
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    try:
        wait_for_port(port)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

        @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate], derandomize=derandomize,
                  suppress_health_check=list(HealthCheck))
        @given(requests(), st.sampled_from([tokens[0], tokens[0], tokens[1], *tokens]))
        def one(request: tuple[str, str, dict[str, str], bytes], token: str) -> None:
            nonlocal sent, to_mcp
            method, path, headers, body = request
            if token:
                headers = {**headers, "Authorization": f"Bearer {token}"}
            built = client.build_request(method, path, headers=headers, content=body if method == "POST" else None)
            response = client.send(built, stream=True)
            if method == "GET":
                response.close()  # a legacy GET stream stays open: its status (and its audit event) came first
                response._content = b""
            else:
                response.read()
            sent += 1
            to_mcp += built.url.path.rstrip("/") == "/mcp"
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            crashed = response.status_code == 500 and not response.headers.get("content-type", "").startswith(
                "application/json")
            assert not crashed, f"the gateway crashed on {request!r}: {response.text}"
            assert b"Traceback" not in response.content, f"a traceback for {request!r}"
            if response.status_code >= 400 and path.rstrip("/") == "/mcp" and response.content:
                error = response.json()["error"]
                assert error["code"] in CODES, f"an error code outside the catalogue: {error}"

        one()
        events = _settled_events(config.audit.sinks[0].path, to_mcp)
        # One event per request, besides one per server->client request the gateway decided on (sampling, ...: no
        # HTTP status of its own) and those of the admin API (GET /admin/audit: no upstream).
        per_request = [e for e in events if e["status"] is not None and e["upstream"] is not None]
        crashes = [e for e in events if e["reason"] in ("exception", "upstream:exception")]
        assert not crashes, f"the gateway raised while handling {len(crashes)} request(s): {crashes[0]}"
        assert len(per_request) == to_mcp, f"{len(per_request)} audit events for {to_mcp} requests"
        _check_upstream_saw_only_allowed(recorder, events)
    except AssertionError as failure:
        print(f"{'http against serve':<26} FAILED after {sent:,} requests: {failure}")
        print("the gateway's log ends:", *(directory / "gateway.log").read_text().splitlines()[-20:], sep="\n  ")
        return False
    finally:
        gateway.terminate()
        gateway.wait(15)
        log.close()
        upstream.stop()
    elapsed = time.perf_counter() - started
    forwarded = len([r for r in recorder.requests if r.method == "POST"])
    print(f"{'http against serve':<26} {sent:>10,} requests {sent / elapsed:>7,.0f}/s  {elapsed:>7.1f} s  0 failures "
          f"(audit events = requests to /mcp = {to_mcp:,}; {forwarded:,} forwarded, each decided; "
          f"statuses {dict(sorted(statuses.items()))})", flush=True)
    return True


def _settled_events(database: Path | None, expected: int) -> list[dict[str, Any]]:
    """The audit events once the writer has caught up (it batches): read until the count stops changing."""
    assert database is not None
    deadline = time.monotonic() + 20
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        db = sqlite3.connect(database)
        db.row_factory = sqlite3.Row
        try:
            events = [dict(row) for row in db.execute("SELECT * FROM audit_events ORDER BY seq")]
        finally:
            db.close()
        if len(events) >= expected:
            time.sleep(0.3)  # and nothing more arrives
            db = sqlite3.connect(database)
            try:
                if db.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0] == len(events):
                    return events
            finally:
                db.close()
        time.sleep(0.1)
    return events


def _check_upstream_saw_only_allowed(recorder: Recorder, events: list[dict[str, Any]]) -> None:
    allowed = {(e["operation"], e["request_id"], e["tool_executed"]) for e in events
               if e["result"] in ("allowed", "upstream_error")}
    for seen in recorder.requests:
        if seen.method != "POST":
            continue
        message = json.loads(seen.body)
        if "method" not in message:
            continue  # the gateway's own answer to a server request it refused
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        tool = params.get("name") if message["method"] == "tools/call" else None
        key = (message["method"], None if "id" not in message else str(message["id"]), tool)
        assert key in allowed, f"the upstream received {message!r}, which no allowed audit event records"


if __name__ == "__main__":
    sys.exit(0 if fuzz_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 1000) else 1)
