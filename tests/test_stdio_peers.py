"""stdio upstreams with real peers: npm server-filesystem, npm server-everything (stdio mode), and the SDK's
MCPServer run over stdio, each behind the gateway and reached with the SDK client over HTTP."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from tests.harness import NODE22, NODE_DIR, ROOT
from tests.node_peers import EVERYTHING
from tests.test_stdio import StdioGateway, text

FILESYSTEM = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"
READ_ONLY = ["read_text_file", "read_file", "list_directory", "list_allowed_directories", "get_file_info"]


def readers_may(*tools: str) -> dict[str, Any]:
    return {"reader": {"permissions": {"can_execute_tools": list(tools)}}}


async def _sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="model said: 42"),
                                     model="test")


async def test_server_filesystem_reads_but_never_writes_under_a_read_only_policy(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "readme.txt").write_text("hello from the docs")
    gateway = StdioGateway(tmp_path, command=[str(NODE22), str(FILESYSTEM), str(docs)], roles=readers_may(*READ_ONLY))
    try:
        async with gateway.client() as session:
            listed = {t.name for t in (await session.list_tools()).tools}
            assert "read_text_file" in listed and "write_file" not in listed and "move_file" not in listed
            read = await session.call_tool("read_text_file", {"path": str(docs / "readme.txt")})
            assert text(read) == "hello from the docs"
            with pytest.raises(MCPError):
                await session.call_tool("write_file", {"path": str(docs / "evil.txt"), "content": "x"})
        assert not (docs / "evil.txt").exists()
        # (server-filesystem also asks its client for roots when it starts; whether a call of this caller's is in
        # progress then, to carry the question, and be refused by the policy, is a matter of timing)
        calls = [(e["tool_executed"], e["result"]) for e in gateway.audit() if e["operation"] == "tools/call"]
        assert calls == [("read_text_file", "allowed"), ("write_file", "denied")]
    finally:
        gateway.stop()


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_server_everything_in_stdio_mode_sees_only_its_env_and_samples_through_its_caller(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "gateway-only")
    gateway = StdioGateway(tmp_path, command=[str(NODE22), str(EVERYTHING), "stdio"], env={"GREETING": "hi"})
    try:
        async with gateway.client("operator", mode=mode, sampling_callback=_sample) as session:
            env = json.loads(text(await session.call_tool("get-env", {})))
            assert "AWS_SECRET_ACCESS_KEY" not in env and env["GREETING"] == "hi"
            sampled = await session.call_tool("trigger-sampling-request", {"prompt": "the answer", "maxTokens": 5})
            assert "model said: 42" in str(sampled.content)
        events = gateway.audit()
        assert [e["result"] for e in events if e["operation"] == "sampling/createMessage"] == ["allowed"]
    finally:
        gateway.stop()


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_sdk_mcpserver_over_stdio_behind_the_gateway(tmp_path: Path, mode: str) -> None:
    gateway = StdioGateway(tmp_path, command=[sys.executable, str(ROOT / "examples" / "demo_server.py"), "--stdio"])
    try:
        async with gateway.client("operator", mode=mode, sampling_callback=_sample) as session:
            assert text(await session.call_tool("echo", {"text": "over stdio"})) == "over stdio"
            assert "model said: 42" in str((await session.call_tool("ask_llm", {"topic": "cats"})).content)
        async with gateway.client("alice", mode=mode) as session:
            with pytest.raises(MCPError) as refused:
                await session.call_tool("delete_file", {"path": "/tmp/x"})
            assert refused.value.error.message == "Unknown tool: delete_file"
    finally:
        gateway.stop()
