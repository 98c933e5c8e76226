"""The gateway in front of @modelcontextprotocol/server-everything (the TypeScript SDK's reference server)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway import create_app
from tests.harness import ServerThread, free_port, write_config
from tests.node_peers import server_everything

Everything = tuple[str, Any, ServerThread]  # the gateway's MCP URL, its app, its server thread

EVERYTHING_POLICY = {
    "roles": {"tester": {"permissions": {
        "can_list_resources": True, "can_read_resources": ["**"], "can_execute_tools": ["*"],
        "can_access_prompts": ["*"], "can_request_sampling": True, "can_elicit": True, "can_list_roots": True,
    }}},
    "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["tester"]}],
}


@pytest.fixture(scope="module")
def everything_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    directory = tmp_path_factory.mktemp("everything")
    with server_everything() as upstream_url:
        port = free_port()
        config = write_config(directory, upstream_url, policy=EVERYTHING_POLICY, public_url=f"http://127.0.0.1:{port}")
        app = create_app(config)
        server = ServerThread(app, port).start()
        try:
            yield f"{server.url}/mcp", app, server
        finally:
            server.stop()


def _client(url: str, app: Any, **callbacks: Any) -> Client:
    config = app.runtime.config
    token = app.runtime.authenticator.issue_token(subject="bob", audience=config.resource_url(config.upstreams[0]),
                                                  scopes=["mcp:tools"])
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(url, http_client=http), **callbacks)


async def test_tools_resources_and_prompts_through_the_gateway(everything_gateway: Everything) -> None:
    url, app, _ = everything_gateway
    async with _client(url, app) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        assert {"echo", "get-sum"} <= tools
        echoed = await session.call_tool("echo", {"message": "hello everything"})
        assert "hello everything" in echoed.content[0].text  # type: ignore[union-attr]
        summed = await session.call_tool("get-sum", {"a": 2, "b": 3})
        assert "5" in summed.content[0].text  # type: ignore[union-attr]
        resources = (await session.list_resources()).resources
        assert resources
        read = await session.read_resource(resources[0].uri)
        assert read.contents
        prompts = (await session.list_prompts()).prompts
        assert prompts


async def test_sampling_round_trip_through_the_gateway(everything_gateway: Everything) -> None:
    url, app, _ = everything_gateway
    asked: list[types.CreateMessageRequestParams] = []

    async def sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params)
        return types.CreateMessageResult(role="assistant", model="test-model",
                                         content=types.TextContent(type="text", text="sampled answer"))

    async with _client(url, app, sampling_callback=sample) as session:
        result = await session.call_tool("trigger-sampling-request", {"prompt": "hi", "maxTokens": 10})
    assert len(asked) == 1 and "hi" in asked[0].messages[0].content.text  # type: ignore[union-attr]
    assert "sampled answer" in str(result.content)
    # The reply to the server's request was POSTed back through the gateway, audited, and answered 202.
    server = everything_gateway[2]
    server.call(app.runtime.audit.flush())
    db = sqlite3.connect(app.runtime.config.audit.sinks[0].path)
    rows = db.execute("SELECT result, status FROM audit_events WHERE operation = 'response'").fetchall()
    db.close()
    assert ("allowed", 202) in rows


async def test_elicitation_round_trip_through_the_gateway(everything_gateway: Everything) -> None:
    url, app, _ = everything_gateway
    asked: list[Any] = []

    async def elicit(context: Any, params: Any) -> types.ElicitResult:
        asked.append(params)
        properties = params.requested_schema.get("properties", {})
        content = {name: _default_for(spec) for name, spec in properties.items()}
        return types.ElicitResult(action="accept", content=content)

    async with _client(url, app, elicitation_callback=elicit) as session:
        result = await session.call_tool("trigger-elicitation-request", {})
    assert len(asked) == 1
    assert not result.is_error, result.content


def _default_for(spec: dict[str, Any]) -> Any:
    """A valid answer for one field of an elicitation form, as a user would fill it in."""
    if "default" in spec:
        return spec["default"]
    if "enum" in spec:
        return spec["enum"][0]
    if "oneOf" in spec:
        return spec["oneOf"][0]["const"]
    if spec.get("type") == "array":
        items = spec.get("items", {})
        choices = items.get("enum") or [c["const"] for c in items.get("anyOf", [])]
        return choices[:1]
    formats = {"email": "ada@example.com", "uri": "https://example.com/", "date": "2000-01-01"}
    if spec.get("format") in formats:
        return formats[spec["format"]]
    return {"number": 1, "integer": 1, "boolean": True}.get(spec.get("type", "string"), "Ada")


ECHO_ONLY = {"roles": {"echoer": {"permissions": {"can_execute_tools": ["echo"]}}},
             "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["echoer"]}]}


def test_2025_03_26_batch_is_decided_message_by_message(tmp_path: Path) -> None:
    with server_everything() as upstream_url:
        port = free_port()
        app = create_app(write_config(tmp_path, upstream_url, policy=ECHO_ONLY, public_url=f"http://127.0.0.1:{port}"))
        server = ServerThread(app, port).start()
        try:
            config = app.runtime.config
            token = app.runtime.authenticator.issue_token(
                subject="bob", audience=config.resource_url(config.upstreams[0]), scopes=["mcp:tools"])
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                       "Accept": "application/json, text/event-stream"}
            url = f"{server.url}/mcp"
            init = httpx.post(url, headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
            headers["Mcp-Session-Id"] = init.headers["mcp-session-id"]
            httpx.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})

            def call(id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
                return {"jsonrpc": "2.0", "id": id, "method": "tools/call",
                        "params": {"name": name, "arguments": arguments}}

            batch = [call(2, "echo", {"message": "a"}), call(3, "get-sum", {"a": 1, "b": 2}),
                     {"jsonrpc": "2.0", "id": 4, "method": "ping"}]
            mixed = httpx.post(url, headers=headers, json=batch)
            answers = {m["id"]: m for m in (json.loads(line[6:]) for line in mixed.text.splitlines()
                                           if line.startswith("data: "))}
            assert "Echo: a" in answers[2]["result"]["content"][0]["text"]
            assert answers[3]["error"] == {"code": -32602, "message": "Unknown tool: get-sum"}
            assert answers[4]["result"] == {}

            refused = httpx.post(url, headers=headers, json=[batch[1], {**batch[1], "id": 5}])
            assert refused.status_code == 200
            assert [m["id"] for m in refused.json()] == [3, 5]
            assert {m["error"]["code"] for m in refused.json()} == {-32602}

            server.call(app.runtime.audit.flush())
            db = sqlite3.connect(config.audit.sinks[0].path)
            rows = db.execute("SELECT request_id, result FROM audit_events WHERE operation = 'tools/call'").fetchall()
            db.close()
            assert sorted(rows) == [("2", "allowed"), ("3", "denied"), ("3", "denied"), ("5", "denied")]
        finally:
            server.stop()


NO_CLIENT_FEATURES = {"roles": {"caller": {"permissions": {"can_execute_tools": ["*"]}}},
                      "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["caller"]}]}


@pytest.mark.parametrize(("tool", "arguments"), [
    ("trigger-sampling-request", {"prompt": "hi", "maxTokens": 10}),
    ("trigger-elicitation-request", {}),
])
async def test_server_requests_are_blocked_without_the_permission(tmp_path: Path, tool: str,
                                                                  arguments: dict[str, Any]) -> None:
    asked: list[Any] = []

    async def sample(context: Any, params: Any) -> types.CreateMessageResult:
        asked.append(params)
        return types.CreateMessageResult(role="assistant", model="m", content=types.TextContent(type="text", text="x"))

    async def elicit(context: Any, params: Any) -> types.ElicitResult:
        asked.append(params)
        return types.ElicitResult(action="decline")

    with server_everything() as upstream_url:
        port = free_port()
        app = create_app(write_config(tmp_path, upstream_url, policy=NO_CLIENT_FEATURES,
                                      public_url=f"http://127.0.0.1:{port}"))
        server = ServerThread(app, port).start()
        try:
            async with _client(f"{server.url}/mcp", app, sampling_callback=sample,
                               elicitation_callback=elicit) as session:
                result = await session.call_tool(tool, arguments)  # returns: the upstream got an error, not silence
            assert asked == [], "the server's request reached the client"
            assert result.is_error and "not allowed by the gateway" in str(result.content)
            server.call(app.runtime.audit.flush())
            db = sqlite3.connect(app.runtime.config.audit.sinks[0].path)
            rows = db.execute("SELECT operation, result, reason FROM audit_events WHERE result = 'denied'").fetchall()
            db.close()
            method = "sampling/createMessage" if "sampling" in tool else "elicitation/create"
            kind = "sampling" if "sampling" in tool else "elicitation"
            assert rows == [(method, "denied", f"no-grant:{kind}")]
        finally:
            server.stop()
