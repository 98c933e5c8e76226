"""An upstream that is down, slow, or dies mid-stream gives the client a JSON-RPC error, never a traceback."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.server.mcpserver import MCPServer

from gateway import create_app, sse
from tests.harness import Deployment, ServerThread, deploy, free_port, write_config
from tests.test_bad_input import BASE_HEADERS, modern


class ScriptedUpstream:
    """A TCP server that answers every connection with fixed bytes, then optionally drops it (fault injection)."""

    def __init__(self, reply: bytes, *, close_after: bool = True) -> None:
        self.reply = reply
        self.close_after = close_after
        self.port = free_port()
        self.received: list[bytes] = []
        self.peer_closed = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.received.append(head + b"\r\n\r\n" + rest)
                conn.sendall(self.reply)
                if not self.close_after:
                    conn.settimeout(30)
                    try:
                        while conn.recv(65536):
                            pass
                    except OSError:
                        pass
                    self.peer_closed.set()

    def close(self) -> None:
        self._sock.close()


def _proxy_to(tmp_path: Path, url: str, **overrides: Any) -> tuple[ServerThread, Any]:
    port = free_port()
    config_path = write_config(tmp_path, url, public_url=f"http://127.0.0.1:{port}", **overrides)
    app = create_app(config_path)
    return ServerThread(app, port).start(), app


def _call(url: str, app: Any, name: str = "echo", arguments: dict[str, Any] | None = None) -> httpx.Response:
    config = app.runtime.config
    token = app.runtime.authenticator.issue_token(subject="alice", audience=config.resource_url(config.upstreams[0]),
                                                  scopes=["mcp:tools"])
    headers, body = modern("tools/call", {"name": name, "arguments": arguments or {"text": "x"}})
    return httpx.post(f"{url}/mcp", headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"},
                      json=body, timeout=30)


def _audit(server: ServerThread, app: Any) -> list[str]:
    server.call(app.runtime.audit.flush())
    db = sqlite3.connect(app.runtime.config.audit.sinks[0].path)
    try:
        return [f"{r[0]}:{r[1]}" for r in db.execute("SELECT result, reason FROM audit_events")]
    finally:
        db.close()


def test_unreachable_upstream_is_a_502_with_the_request_id(tmp_path: Path) -> None:
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{free_port()}/mcp")
    try:
        response = _call(server.url, app)
        assert response.status_code == 502
        assert response.json() == {"jsonrpc": "2.0", "id": 7,
                                   "error": {"code": -32050, "message": "Upstream unavailable: connect"}}
        assert _audit(server, app) == ["upstream_error:upstream:connect"]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'mcp_gateway_upstream_errors_total{kind="connect",upstream="demo"} 1.0' in metrics
    finally:
        server.stop()


@pytest.fixture
def slow_upstream() -> Iterator[ServerThread]:
    mcp = MCPServer("slow")

    @mcp.tool()
    async def wait(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    server = ServerThread(mcp.streamable_http_app(stateless_http=True, json_response=True)).start()
    yield server
    server.stop()


def test_silent_upstream_is_a_504(tmp_path: Path, slow_upstream: ServerThread) -> None:
    server, app = _proxy_to(tmp_path, f"{slow_upstream.url}/mcp",
                            limits={"upstream_timeout_s": 0.5},
                            policy={"roles": {"r": {"permissions": {"can_execute_tools": ["*"]}}},
                                    "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["r"]}]})
    try:
        response = _call(server.url, app, "wait", {"seconds": 3})
        assert response.status_code == 504
        assert response.json()["error"] == {"code": -32051, "message": "Upstream timed out: timeout"}
        assert response.json()["id"] == 7
        quick = _call(server.url, app, "wait", {"seconds": 0})
        assert quick.status_code == 200 and "done" in quick.text
        assert _audit(server, app) == ["upstream_error:upstream:timeout", "allowed:role:r:tool"]
    finally:
        server.stop()


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"


def test_upstream_reset_mid_stream_ends_with_an_error_for_the_open_call(tmp_path: Path) -> None:
    events = b"id: 1\ndata:\n\n: keep-alive\n\n"
    chunked_head = SSE_HEAD.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    # One chunk (a priming event and a comment), then the connection drops before the last chunk.
    upstream = ScriptedUpstream(chunked_head + f"{len(events):x}\r\n".encode() + events + b"\r\n")
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{upstream.port}/mcp")
    try:
        response = _call(server.url, app)
        assert response.status_code == 200
        assert response.text.startswith("id: 1\ndata:\n\n: keep-alive\n\n")
        last = [line for line in response.text.splitlines() if line.startswith("data: ")][-1]
        assert json.loads(last[len("data: "):]) == {
            "jsonrpc": "2.0", "id": 7, "error": {"code": -32050, "message": "Upstream unavailable: reset"}}
        assert _audit(server, app) == ["upstream_error:upstream:reset"]
    finally:
        server.stop()
        upstream.close()


def test_sse_fields_pass_through_as_the_gateway_read_them(tmp_path: Path) -> None:
    stream = (b": a comment\r\nretry: 1500\r\nid: 0\r\ndata:\r\n\r\n"  # CRLF priming event (2025-11-25)
              b"event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\n"
              b"data: \"params\":{\"progressToken\":1,\"progress\":1}}\n\n"
              b"data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"content\":[],\"isError\":false}}\n\n")
    upstream = ScriptedUpstream(SSE_HEAD.replace(b"\r\n\r\n", f"\r\nContent-Length: {len(stream)}\r\n\r\n".encode())
                                + stream)
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{upstream.port}/mcp")
    try:
        response = _call(server.url, app)

        def fields(raw: bytes) -> list[tuple[object, ...]]:
            return [(e.data and json.loads(e.data), e.event, e.id, e.retry, e.comments)
                    for e in sse.Decoder().feed(raw)]

        # Every field arrives, re-encoded from what was decoded (one line-end style, one serialisation).
        assert fields(response.content) == fields(stream) and len(fields(stream)) == 3
        assert b"\r" not in response.content
        assert _audit(server, app) == ["allowed:role:reader:tool"]
        forwarded = upstream.received[0].lower()
        assert b"authorization:" not in forwarded
        assert b"x-api-key: upstream-secret" in forwarded
        assert f"host: 127.0.0.1:{upstream.port}".encode() in forwarded
        assert b"x-forwarded-for: 127.0.0.1" in forwarded and b"x-forwarded-proto: http" in forwarded
    finally:
        server.stop()
        upstream.close()


def test_in_process_app_that_raises_is_a_500_json_rpc_error(tmp_path: Path) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise RuntimeError("the in-process app failed")

    deployment: Deployment = deploy("middleware", tmp_path, upstream_app=broken)
    try:
        response = _call(deployment.gateway.url, deployment.gateway.server.config.app)
        assert response.status_code == 500
        assert response.json() == {"jsonrpc": "2.0", "id": 7, "error": {"code": -32603, "message": "Internal error"}}
        assert [e["result"] for e in deployment.audit_events()] == ["upstream_error"]
    finally:
        deployment.stop()


def test_client_that_goes_away_closes_the_upstream_stream(tmp_path: Path) -> None:
    chunked_head = SSE_HEAD.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    upstream = ScriptedUpstream(chunked_head + b"8\r\n: open\n\n\r\n", close_after=False)  # a stream that never ends
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{upstream.port}/mcp")
    try:
        audience = app.runtime.config.resource_url(app.runtime.config.upstreams[0])
        token = app.runtime.authenticator.issue_token(subject="alice", audience=audience)
        with httpx.stream("GET", f"{server.url}/mcp", headers={"Authorization": f"Bearer {token}",
                                                               "Accept": "text/event-stream"}) as response:
            assert next(response.iter_bytes()) == b": open\n\n"
        assert upstream.peer_closed.wait(10), "the gateway kept reading the upstream after the client left"
    finally:
        server.stop()
        upstream.close()
