"""End to end with the official SDK client through the gateway, in both protocol eras and both deployment modes."""

from __future__ import annotations

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.harness import Deployment


def client(deployment: Deployment, mode: str, token: str | None = None) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token or deployment.token()}"})
    return Client(streamable_http_client(deployment.url, http_client=http), mode=mode)


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_list_call_read_and_get_prompt_through_the_gateway(gateway: Deployment, era: str) -> None:
    async with client(gateway, era) as session:
        tools = await session.list_tools()
        assert {"search", "echo", "get_weather"} <= {t.name for t in tools.tools}
        called = await session.call_tool("echo", {"text": "through the gateway"})
        assert called.content[0].text == "through the gateway"  # type: ignore[union-attr]
        read = await session.read_resource("file:///srv/docs/readme")
        assert read.contents[0].text == "The demo docs."  # type: ignore[union-attr]
        prompt = await session.get_prompt("summarize", {"text": "abc"})
        assert "Summarise this: abc" in prompt.messages[0].content.text  # type: ignore[union-attr]

    methods = gateway.recorder.mcp_methods()
    seen_headers = [r.headers for r in gateway.recorder.requests]
    assert all("authorization" not in h for h in seen_headers), "the client's token reached the upstream"
    if era == "legacy":
        assert methods[0] == "initialize"
        assert any("mcp-session-id" in h for h in seen_headers[1:]), "legacy session id not passed upstream"
        assert any(t.startswith("text/event-stream") for t in gateway.recorder.response_types)
        assert "DELETE" in methods, "session end not forwarded"
    else:
        assert methods[0] == "server/discover"
        assert all(h.get("mcp-protocol-version") == "2026-07-28" for h in seen_headers)
        assert "initialize" not in methods


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_refused_call_is_an_mcp_error_and_the_connection_keeps_working(gateway: Deployment, era: str) -> None:
    async with client(gateway, era) as session:
        with pytest.raises(MCPError) as refused:
            await session.call_tool("delete_file", {"path": "/etc/passwd"})
        assert refused.value.error.code == -32602
        assert refused.value.error.message == "Unknown tool: delete_file"
        again = await session.call_tool("echo", {"text": "still here"})
        assert again.content[0].text == "still here"  # type: ignore[union-attr]
    assert "delete_file" not in b"".join(r.body for r in gateway.recorder.requests).decode()
    denied = [e for e in gateway.audit_events() if e["result"] == "denied"]
    assert [(e["tool_executed"], e["reason"], e["user_id"]) for e in denied] == [
        ("delete_file", "no-grant:tool", "alice")
    ]


async def test_operator_token_reaches_the_dangerous_tool(gateway: Deployment) -> None:
    token = gateway.token("olga", scopes=(), groups=["ops"])
    async with client(gateway, "auto", token) as session:
        result = await session.call_tool("delete_file", {"path": "/tmp/x"})
        assert result.content[0].text == "deleted /tmp/x"  # type: ignore[union-attr]
    allowed = [e for e in gateway.audit_events()
               if e["tool_executed"] == "delete_file" and e["operation"] == "tools/call"]
    assert [(e["result"], e["roles"], e["arguments"]) for e in allowed] == [
        ("allowed", "operator", '{"path":"/tmp/x"}')
    ]


async def test_stateless_json_upstream_works_in_both_eras(stateless_gateway: Deployment) -> None:
    for era in ("auto", "legacy"):
        async with client(stateless_gateway, era) as session:
            result = await session.call_tool("get_weather", {"city": "Oslo"})
            assert result.content[0].text == "Sunny in Oslo"  # type: ignore[union-attr]
    assert "application/json" in stateless_gateway.recorder.response_types[-1]


async def test_every_message_gets_one_audit_event_with_who_and_what(gateway: Deployment) -> None:
    async with client(gateway, "auto") as session:
        await session.call_tool("search", {"query": "demo", "password": "hunter2"})
    events = gateway.audit_events()
    calls = [e for e in events if e["operation"] == "tools/call"]
    assert len(calls) == 1
    call = calls[0]
    assert (call["result"], call["user_id"], call["tool_executed"], call["upstream"]) == (
        "allowed", "alice", "search", "demo")
    assert call["status"] == 200 and call["protocol_version"] == "2026-07-28"
    assert "hunter2" not in call["arguments"] and "[REDACTED]" in call["arguments"]
    messages = [e for e in events if e["operation"] not in ("tools/new", "tools/definition_changed")]  # pinning's
    assert len(messages) == len(gateway.recorder.requests)


async def test_discover_works_for_a_principal_with_no_role(gateway: Deployment) -> None:
    # The SDK's auto mode falls back to the legacy handshake on any 4xx for server/discover, so a
    # refused discover would silently change the protocol era; it is protocol plumbing, always allowed.
    async with client(gateway, "auto", gateway.token("nobody", scopes=())) as session:
        with pytest.raises(MCPError) as refused:
            await session.list_tools()
        assert (refused.value.error.code, refused.value.error.message) == (-32011, "Forbidden")
    assert gateway.recorder.mcp_methods() == ["server/discover"]
    assert [(e["operation"], e["result"], e["reason"]) for e in gateway.audit_events()] == [
        ("server/discover", "allowed", "protocol:discover"), ("tools/list", "denied", "no-role")]
