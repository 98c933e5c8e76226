"""Authorization end to end: the SDK client through the gateway to a real MCPServer, both eras, both modes.

Every refusal here is checked three ways: the client sees it, the upstream never
saw the refused request, and the audit log recorded it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.harness import DEFAULT_POLICY, Deployment, deploy
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_e2e_sdk import client

ERAS = ["auto", "legacy"]


@pytest.mark.parametrize("era", ERAS)
async def test_a_reader_sees_only_its_tools_resources_and_prompts(gateway: Deployment, era: str) -> None:
    async with client(gateway, era) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        resources = {str(r.uri) for r in (await session.list_resources()).resources}
        templates = {t.uri_template for t in (await session.list_resource_templates()).resource_templates}
        prompts = {p.name for p in (await session.list_prompts()).prompts}
    assert tools == {"search", "get_weather", "get_forecast", "echo"}  # not delete_file, not ask_llm
    assert resources == {"file:///srv/docs/readme"}
    assert templates == {"file:///srv/docs/{name}"}
    assert prompts == {"summarize"}


async def test_an_operator_sees_every_tool(gateway: Deployment) -> None:
    async with client(gateway, "auto", gateway.token("olga", scopes=(), groups=["ops"])) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
    assert {"delete_file", "ask_llm", "search"} <= tools


TRAVERSALS = [
    "file:///srv/docs/../etc/passwd",
    "file:///srv/docs/%2e%2e/%2e%2e/etc/passwd",
    "file:///srv/docs/%2E%2E/secret",
    "file:///srv/docs/..%2f..%2fetc%2fpasswd",
    "file:///srv/docs/readme%00.txt",
    "file:///srv/docs/..\\..\\etc\\passwd",
    "file:///srv/docs/secret/keys",  # two segments deep: the reader's * stays within one
]


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("uri", TRAVERSALS)
async def test_resource_traversal_is_refused_before_the_upstream(gateway: Deployment, era: str, uri: str) -> None:
    async with client(gateway, era) as session:
        with pytest.raises(MCPError) as refused:
            await session.read_resource(uri)
        assert refused.value.error.code == -32602
        assert refused.value.error.message.startswith("Unknown resource: ")
    reads = [r for r in gateway.recorder.requests if b"resources/read" in r.body]
    assert reads == [], "a refused read reached the upstream"
    denied = [e for e in gateway.audit_events() if e["operation"] == "resources/read"]
    assert [(e["result"], e["resource_accessed"]) for e in denied] == [("denied", uri)]


async def test_a_read_is_forwarded_in_the_form_it_was_decided_in(gateway: Deployment) -> None:
    async with client(gateway, "auto") as session:
        read = await session.read_resource("FILE:///srv/docs/sub/%2e%2e/readme")
        assert read.contents[0].text == "The demo docs."  # type: ignore[union-attr]
    [seen] = [r for r in gateway.recorder.requests if b"resources/read" in r.body]
    assert json.loads(seen.body)["params"]["uri"] == "file:///srv/docs/readme"
    assert seen.headers["mcp-name"] == "file:///srv/docs/readme"


async def _sampler(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    return types.CreateMessageResult(role="assistant", model="test", content=types.TextContent(type="text", text="42"))


@pytest.mark.parametrize("era", ERAS)
async def test_sampling_is_blocked_without_the_permission_in_both_eras(tmp_path: Path, era: str) -> None:
    policy = {**DEFAULT_POLICY, "roles": {**DEFAULT_POLICY["roles"], "reader": {"permissions": {
        **DEFAULT_POLICY["roles"]["reader"]["permissions"], "can_execute_tools": ["ask_llm", "echo"]}}}}
    deployment = deploy("proxy", tmp_path, policy=policy)
    asked: list[Any] = []

    async def sampler(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params)
        return await _sampler(context, params)

    try:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {deployment.token()}"})
        async with Client(streamable_http_client(deployment.url, http_client=http), mode=era,
                          sampling_callback=sampler) as session:
            with pytest.raises(MCPError) as refused:
                await session.call_tool("ask_llm", {"topic": "cats"})
            if era == "legacy":
                # The request was dropped from the stream and the upstream got the gateway's error in its place;
                # the SDK server fails the call with it (instead of waiting for an answer that never comes).
                assert "sampling/createMessage is not allowed by the gateway's policy" in refused.value.error.message
            else:
                # inputRequests held only the refused sampling request: the result became the gateway's error.
                assert refused.value.error.code == -32011
            after = await session.call_tool("echo", {"text": "still connected"})
            assert after.content[0].text == "still connected"  # type: ignore[union-attr]
        assert asked == [], "the sampling request reached the client"
        answers = [json.loads(r.body) for r in deployment.recorder.requests if b'"error"' in r.body]
        if era == "legacy":
            assert [a["error"]["code"] for a in answers] == [-32011]  # the gateway answered for the client
        events = deployment.audit_events()
        assert [(e["operation"], e["result"], e["reason"]) for e in events if e["operation"] == "sampling/createMessage"
                ] == [("sampling/createMessage", "denied", "no-grant:sampling")]
    finally:
        deployment.stop()


@pytest.mark.parametrize("era", ERAS)
async def test_sampling_works_for_a_principal_with_the_permission(gateway: Deployment, era: str) -> None:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {gateway.token('olga', (), groups=['ops'])}"})
    async with Client(streamable_http_client(gateway.url, http_client=http), mode=era,
                      sampling_callback=_sampler) as session:
        result = await session.call_tool("ask_llm", {"topic": "cats"})
    assert "model said: 42" in str(result.content)
    allowed = [e for e in gateway.audit_events() if e["operation"] == "sampling/createMessage"]
    assert allowed and all(e["result"] == "allowed" for e in allowed)


def _post(deployment: Deployment, token: str, method: str, params: dict[str, Any]) -> httpx.Response:
    headers, body = modern(method, params)
    return httpx.post(deployment.url, headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"},
                      json=body)


def test_a_retry_answering_a_refused_sampling_request_is_refused(gateway: Deployment) -> None:
    answer = {"role": "assistant", "model": "m", "content": {"type": "text", "text": "x"}}
    response = _post(gateway, gateway.token(), "tools/call",
                     {"name": "echo", "arguments": {"text": "x"}, "inputResponses": {"k": answer}})
    assert response.status_code == 403  # minimal detail: "forbidden" and nothing about the policy
    assert response.json()["error"] == {"code": -32011, "message": "Forbidden"}
    assert gateway.recorder.requests == []
    assert [e["reason"] for e in gateway.audit_events()] == ["input_response:sampling"]


STEP_UP_POLICY = {
    "roles": {
        "reader": {"security_level": "critical", "capabilities": ["filesystem:write"],
                   "permissions": {"can_execute_tools": ["echo", "delete_file"]}},
        "admin": {"security_level": "critical", "permissions": {"can_execute_tools": ["*"]}},
    },
    "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["reader"]},
                 {"when": {"scope": "mcp:admin"}, "roles": ["admin"]}],
    "tools": {"delete_file": {"security_level": "critical", "capabilities": ["filesystem:write"]},
              "ask_llm": {"security_level": "low"}},
    "authentication_levels": {"rules": [{"when": {"acr": "urn:mfa:hwk"}, "level": "critical"}], "default": "standard"},
}


@pytest.mark.parametrize("mode", ["proxy", "middleware"])
def test_step_up_and_scope_challenges(tmp_path: Path, mode: str) -> None:
    deployment = deploy(mode, tmp_path, policy=STEP_UP_POLICY)
    try:
        token = deployment.token()
        weak = _post(deployment, token, "tools/call", {"name": "delete_file", "arguments": {"path": "/x"}})
        assert weak.status_code == 401
        assert weak.json()["error"]["code"] == -32012
        challenge = weak.headers["www-authenticate"]
        assert 'error="insufficient_user_authentication"' in challenge
        assert 'acr_values="urn:mfa:hwk"' in challenge and "resource_metadata=" in challenge

        strong = _post(deployment, deployment.token(acr="urn:mfa:hwk"), "tools/call",
                       {"name": "delete_file", "arguments": {"path": "/x"}})
        assert strong.status_code == 200 and "deleted /x" in strong.text

        scoped = _post(deployment, token, "tools/call", {"name": "ask_llm", "arguments": {"topic": "x"}})
        assert scoped.status_code == 403
        assert scoped.json()["error"]["code"] == -32011
        assert 'error="insufficient_scope", scope="mcp:admin"' in scoped.headers["www-authenticate"]

        calls = [json.loads(r.body)["params"]["name"] for r in deployment.recorder.requests
                 if b'"tools/call"' in r.body]
        assert calls == ["delete_file"]  # only the strong one
        results = [(e["tool_executed"], e["result"], e["reason"]) for e in deployment.audit_events()]
        assert results == [("delete_file", "denied", "level:authentication<critical"),
                           ("delete_file", "allowed", "role:reader:tool"),
                           ("ask_llm", "denied", "no-grant:tool")]
    finally:
        deployment.stop()


def test_explain_says_which_rule_refused(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path, policy={**DEFAULT_POLICY, "deny_detail": "explain"})
    try:
        response = _post(deployment, deployment.token(), "tools/call", {"name": "delete_file", "arguments": {}})
        assert response.status_code == 403
        assert response.json()["error"] == {
            "code": -32011, "message": "Forbidden: tools/call delete_file refused by no-grant:tool"}
    finally:
        deployment.stop()


def test_a_server_request_on_the_legacy_get_stream_is_dropped_and_answered_upstream(tmp_path: Path) -> None:
    from tests.test_upstream_failures import SSE_HEAD, ScriptedUpstream, _proxy_to

    sampling = {"jsonrpc": "2.0", "id": 40, "method": "sampling/createMessage",
                "params": {"messages": [], "maxTokens": 5}}
    progress = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hi"}}
    events = (b"id: 1\ndata: " + json.dumps(sampling).encode() + b"\n\n"
              + b"id: 2\ndata: " + json.dumps(progress).encode() + b"\n\n")
    upstream = ScriptedUpstream(SSE_HEAD.replace(b"\r\n\r\n", f"\r\nContent-Length: {len(events)}\r\n\r\n".encode())
                                + events)
    server, app = _proxy_to(tmp_path, f"http://127.0.0.1:{upstream.port}/mcp")
    try:
        audience = app.runtime.config.resource_url(app.runtime.config.upstreams[0])
        token = app.runtime.authenticator.issue_token(subject="alice", audience=audience, scopes=["mcp:tools"])
        # The session the scripted upstream's stream belongs to, bound to alice as her initialize would have.
        server.call(app.runtime.sessions.bind("s-1", (app.runtime.config.public_url, "alice", "")))
        stream = httpx.get(f"{server.url}/mcp", headers={"Authorization": f"Bearer {token}",
                                                         "Accept": "text/event-stream", "Mcp-Session-Id": "s-1",
                                                         "MCP-Protocol-Version": "2025-11-25"})
        assert stream.status_code == 200
        assert "sampling/createMessage" not in stream.text and "notifications/message" in stream.text

        def answered() -> list[bytes]:
            return [r for r in upstream.received if r.startswith(b"POST")]

        deadline = time.monotonic() + 10
        while not answered() and time.monotonic() < deadline:
            time.sleep(0.05)
        [post] = answered()
        head, _, body = post.partition(b"\r\n\r\n")
        assert json.loads(body) == {"jsonrpc": "2.0", "id": 40, "error": {
            "code": -32011, "message": "Forbidden: sampling/createMessage is not allowed by the gateway's policy"}}
        assert b"mcp-session-id: s-1" in head.lower() and b"authorization" not in head.lower()
    finally:
        server.stop()
        upstream.close()
