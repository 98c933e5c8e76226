"""MCP Inspector 2.x CLI (npm @modelcontextprotocol/inspector, on Node 22) calls tools through the gateway."""

from __future__ import annotations

import json
import subprocess

from tests.harness import NODE22, NODE_DIR, Deployment
from tests.node_peers import node_env

INSPECTOR = NODE_DIR / "node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js"


def inspector(deployment: Deployment, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(NODE22), str(INSPECTOR), "--cli", deployment.url, "--transport", "http",
               "--method", "tools/call", "--tool-name", tool, *args,
               "--header", f"Authorization: Bearer {deployment.token()}", "--stored-auth-only"]
    return subprocess.run(command, env=node_env(), capture_output=True, text=True, timeout=120)


def test_inspector_cli_calls_a_tool_through_the_gateway(gateway: Deployment) -> None:
    done = inspector(gateway, "echo", "--tool-arg", "text=from the inspector")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["content"][0]["text"] == "from the inspector"
    assert not result["isError"]
    assert all("authorization" not in r.headers for r in gateway.recorder.requests)


def test_inspector_cli_does_not_see_a_tool_hidden_by_the_policy(gateway: Deployment) -> None:
    done = inspector(gateway, "delete_file", "--tool-arg", "path=/etc/passwd")
    assert done.returncode != 0
    assert "Tool 'delete_file' not found on server" in done.stderr  # tools/list came back filtered
    assert b"delete_file" not in b"".join(r.body for r in gateway.recorder.requests)
