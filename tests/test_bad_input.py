"""Every bad input has a defined status, JSON-RPC error and audit event, and the upstream receives nothing."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest

from tests.harness import MODERN, Deployment


def modern(method: str, params: dict[str, Any] | None = None, id: int = 7) -> tuple[dict[str, str], dict[str, Any]]:
    """A valid 2026-07-28 request: body with the `_meta` envelope, and matching routing headers."""
    body_params = dict(params or {})
    body_params["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN,
                            "io.modelcontextprotocol/clientCapabilities": {}}
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    target = body_params.get("name", body_params.get("uri", body_params.get("taskId")))
    if method in ("tools/call", "prompts/get", "resources/read", "tasks/get", "tasks/update", "tasks/cancel") \
            and isinstance(target, str):
        headers["Mcp-Name"] = target
    return headers, {"jsonrpc": "2.0", "id": id, "method": method, "params": body_params}


BASE_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@dataclass
class Row:
    name: str
    status: int
    code: int
    result: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    method: str = "POST"
    token: Callable[[Deployment], str | None] | None = None  # default: a valid reader token
    url_suffix: str = ""
    challenge: str | None = None  # expected fragment of WWW-Authenticate
    headers_extra: list[tuple[str, str]] = field(default_factory=list)  # repeated headers, sent as they are


def _modern_body(method: str, params: dict[str, Any] | None = None, **header_changes: str | None) -> tuple[
        dict[str, str], bytes]:
    headers, body = modern(method, params)
    for key, value in header_changes.items():
        name = key.replace("_", "-")
        headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
        if value is not None:
            headers[name] = value
    return headers, json.dumps(body).encode()


def _row(name: str, status: int, code: int, result: str, pair: tuple[dict[str, str], bytes], **kw: Any) -> Row:
    return Row(name, status, code, result, headers=pair[0], body=pair[1], **kw)


def _nested(depth: int) -> bytes:
    inner: Any = "x"
    for _ in range(depth):
        inner = [inner]
    _, body = modern("tools/call", {"name": "echo", "arguments": {"text": inner}})
    return json.dumps(body).encode()


def _foreign_token(deployment: Deployment) -> str:
    return deployment.runtime.authenticator.issue_token(subject="alice", audience="http://elsewhere/mcp",
                                                        scopes=["mcp:tools"])


def _expired_token(deployment: Deployment) -> str:
    key = deployment.runtime.signing_key
    now = int(time.time())
    claims = {"iss": deployment.runtime.config.public_url, "sub": "alice", "aud": deployment.url,
              "iat": now - 7200, "exp": now - 3600, "scope": "mcp:tools"}
    return jwt.encode(claims, key.private, algorithm="ES256", headers={"kid": key.kid})


def _b64(text: str) -> str:
    """A routing header value in the base64 sentinel form (how a client sends a non-ASCII name)."""
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


CALL = {"name": "echo", "arguments": {"text": "hi"}}
B64_ECHO = "=?base64?" + base64.b64encode(b"echo").decode() + "?="

ROWS = [
    Row("body over max_body_bytes (declared)", 413, -32600, "invalid_request", body=b"{" + b" " * 70000 + b"}"),
    Row("not JSON", 400, -32700, "invalid_request", body=b'{"jsonrpc": "2.0", "id": 1,'),
    Row("JSON but not JSON-RPC", 400, -32600, "invalid_request", body=b'{"hello": "world"}'),
    Row("empty batch", 400, -32600, "invalid_request", body=b"[]"),
    Row("a bare string", 400, -32600, "invalid_request", body=b'"tools/call"'),
    Row("method not a string", 400, -32600, "invalid_request", body=b'{"jsonrpc":"2.0","id":1,"method":5}'),
    Row("nesting deeper than max_json_depth", 400, -32600, "invalid_request", body=_nested(40)),
    Row("content type not JSON", 415, -32600, "invalid_request", headers={"Content-Type": "text/plain"},
        body=b'{"jsonrpc":"2.0","id":1,"method":"ping"}'),
    Row("HTTP method PUT", 405, -32600, "invalid_request", method="PUT", body=b"{}"),
    Row("foreign Origin", 403, -32600, "invalid_request", headers={"Origin": "http://evil.example"},
        body=b'{"jsonrpc":"2.0","id":1,"method":"ping"}'),
    _row("MCP-Protocol-Version missing", 400, -32020, "invalid_request",
         _modern_body("tools/call", CALL, MCP_Protocol_Version=None)),
    _row("MCP-Protocol-Version differs from _meta", 400, -32020, "invalid_request",
         _modern_body("tools/call", CALL, MCP_Protocol_Version="2025-11-25")),
    _row("Mcp-Method missing", 400, -32020, "invalid_request", _modern_body("tools/call", CALL, Mcp_Method=None)),
    _row("Mcp-Method differs from body", 400, -32020, "invalid_request",
         _modern_body("tools/call", CALL, Mcp_Method="tools/list")),
    _row("Mcp-Name missing", 400, -32020, "invalid_request", _modern_body("tools/call", CALL, Mcp_Name=None)),
    _row("Mcp-Name names another tool", 400, -32020, "invalid_request",
         _modern_body("tools/call", CALL, Mcp_Name="search")),
    _row("Mcp-Name with a broken base64 sentinel", 400, -32020, "invalid_request",
         _modern_body("tools/call", CALL, Mcp_Name="=?base64?ZWNo!!?=")),
    _row("Mcp-Param header on a method that has none", 400, -32020, "invalid_request",
         _modern_body("tools/list", None, Mcp_Param_Region="eu")),
    Row("batch in the 2026-07-28 era", 400, -32600, "invalid_request",
        headers={"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list"},
        body=json.dumps([modern("tools/list")[1], modern("tools/list", id=8)[1]]).encode()),
    Row("batch under 2025-06-18", 400, -32600, "invalid_request", headers={"MCP-Protocol-Version": "2025-06-18"},
        body=b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]'),
    _row("unknown method", 404, -32601, "denied", _modern_body("admin/shutdown")),
    Row("tools/call without a string name (legacy era)", 400, -32602, "invalid_request",
        body=b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}'),
    _row("tools/call with a numeric name (2026-07-28: no Mcp-Name can match)", 400, -32020, "invalid_request",
         _modern_body("tools/call", {"name": 5}, Mcp_Name=None)),
    # Messages the upstream would read as something other than what the gateway could decide on.
    Row("a request method without an id (a notification the upstream would run)", 400, -32602, "invalid_request",
        body=b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/x"}}}'),
    Row("a notification of an unknown method", 404, -32601, "denied",
        body=b'{"jsonrpc":"2.0","method":"admin/shutdown"}'),
    Row("a response to no request the gateway passed on", 400, -32600, "denied",
        body=b'{"jsonrpc":"2.0","id":40,"result":{"role":"assistant","model":"m","content":{"type":"text",'
             b'"text":"x"}}}'),
    Row("an error response to no request the gateway passed on", 400, -32600, "denied",
        body=b'{"jsonrpc":"2.0","id":40,"error":{"code":-1,"message":"no"}}'),
    # One segment to a glob like file:///srv/docs/*, and "../secrets" to an upstream that folds or decodes it.
    _row("a URI with fullwidth dots and solidus (NFKC: ../)", 400, -32602, "denied",
         _modern_body("resources/read", {"uri": "file:///srv/docs/\uff0e\uff0e\uff0fsecrets"},
                      Mcp_Name=_b64("file:///srv/docs/\uff0e\uff0e\uff0fsecrets"))),
    _row("a URI with them percent-encoded", 400, -32602, "denied",
         _modern_body("resources/read", {"uri": "file:///srv/docs/%EF%BC%8E%EF%BC%8E%EF%BC%8Fsecrets"})),
    _row("a URI with overlong UTF-8 dots and slash", 400, -32602, "denied",
         _modern_body("resources/read", {"uri": "file:///srv/docs/%C0%AE%C0%AE%C0%AFsecrets"})),
    Row("a tool name with a NUL", 400, -32602, "invalid_request",
        body=b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo\\u0000x"}}'),
    _row("Mcp-Session-Id twice", 400, -32600, "invalid_request", _modern_body("tools/list"),
         headers_extra=[("Mcp-Session-Id", "a"), ("Mcp-Session-Id", "b")]),
    _row("Content-Type twice", 400, -32600, "invalid_request", _modern_body("tools/list"),
         headers_extra=[("Content-Type", "application/json"), ("Content-Type", "text/plain")]),
    _row("no token", 401, -32001, "auth_failed", _modern_body("tools/list"), token=lambda d: None,
         challenge='resource_metadata="http://127.0.0.1:'),
    _row("token in the query string", 401, -32001, "auth_failed", _modern_body("tools/list"),
         token=lambda d: None, url_suffix="?access_token=abc", challenge='error="invalid_request"'),
    _row("Basic instead of Bearer", 401, -32001, "auth_failed", _modern_body("tools/list"),
         token=lambda d: "Basic YWxpY2U6c2VjcmV0", challenge='error="invalid_request"'),
    _row("token for another resource", 401, -32001, "auth_failed", _modern_body("tools/list"),
         token=_foreign_token, challenge='error="invalid_token"'),
    _row("expired token", 401, -32001, "auth_failed", _modern_body("tools/list"), token=_expired_token,
         challenge='error="invalid_token"'),
    _row("garbage token", 401, -32001, "auth_failed", _modern_body("tools/list"), token=lambda d: "not.a.jwt",
         challenge='error="invalid_token"'),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_is_refused_audited_and_never_forwarded(gateway: Deployment, row: Row) -> None:
    headers = {**BASE_HEADERS, **row.headers}
    token = row.token(gateway) if row.token is not None else gateway.token()
    if token is not None:
        headers["Authorization"] = token if token.startswith("Basic ") else f"Bearer {token}"
    repeated = {name.lower() for name, _ in row.headers_extra}
    sent = [*((k, v) for k, v in headers.items() if k.lower() not in repeated), *row.headers_extra]
    response = httpx.request(row.method, gateway.url + row.url_suffix, headers=sent, content=row.body)

    assert response.status_code == row.status, response.text
    error = response.json()["error"]
    assert error["code"] == row.code
    if row.challenge is not None:
        assert row.challenge in response.headers["www-authenticate"]
        assert "resource_metadata=" in response.headers["www-authenticate"]
    assert gateway.recorder.requests == [], "the upstream received a refused request"
    events = gateway.audit_events()
    assert [e["result"] for e in events] == [row.result]
    assert events[0]["status"] == row.status


def test_oversized_chunked_body_is_refused_while_reading(gateway: Deployment) -> None:
    def chunks() -> Any:
        yield b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}}}'

    response = httpx.post(gateway.url, headers={**BASE_HEADERS, "Authorization": f"Bearer {gateway.token()}"},
                          content=chunks())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == -32600
    assert gateway.recorder.requests == []


def test_refusal_carries_the_request_id(gateway: Deployment) -> None:
    headers, body = _modern_body("tools/call", CALL, Mcp_Name="search")
    response = httpx.post(gateway.url, headers={**BASE_HEADERS, **headers,
                                                "Authorization": f"Bearer {gateway.token()}"}, content=body)
    assert response.json()["id"] == 7


def test_base64_sentinel_name_that_matches_is_forwarded(gateway: Deployment) -> None:
    headers, body = _modern_body("tools/call", CALL, Mcp_Name=B64_ECHO)
    response = httpx.post(gateway.url, headers={**BASE_HEADERS, **headers,
                                                "Authorization": f"Bearer {gateway.token()}"}, content=body)
    assert response.status_code == 200, response.text
    assert "hi" in response.text


def _post(gateway: Deployment, pair: tuple[dict[str, str], bytes]) -> httpx.Response:
    return httpx.post(gateway.url, headers={**BASE_HEADERS, **pair[0], "Authorization": f"Bearer {gateway.token()}"},
                      content=pair[1])


def test_mcp_param_headers_are_checked_against_the_tool_schema(gateway: Deployment) -> None:
    assert _post(gateway, _modern_body("tools/list")).status_code == 200  # the gateway learns the schemas here
    call = {"name": "get_forecast", "arguments": {"region": "eu-west", "days": 2}}
    gateway.recorder.clear()

    wrong = _post(gateway, _modern_body("tools/call", call, Mcp_Param_Region="us-east"))
    missing = _post(gateway, _modern_body("tools/call", call))
    undeclared = _post(gateway, _modern_body("tools/call", call, Mcp_Param_Region="eu-west", Mcp_Param_Days="2"))
    assert [r.status_code for r in (wrong, missing, undeclared)] == [400, 400, 400]
    assert {r.json()["error"]["code"] for r in (wrong, missing, undeclared)} == {-32020}
    assert gateway.recorder.requests == []

    right = _post(gateway, _modern_body("tools/call", call, Mcp_Param_Region="eu-west"))
    assert right.status_code == 200 and "2 day(s) of sun in eu-west" in right.text
