"""A tool's annotations raise the level a policy leaves unsaid: `destructiveHint: true` asks for high,
`openWorldHint: true` for standard; they never lower a level the policy sets, nor a level of a tool the policy
names (a server is not trusted to relax the policy). As a table, then end to end with an SDK server whose tools
carry annotations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

from gateway.mcp import Operation
from gateway.policy import decide, parse_policy
from gateway.policy.engine import annotation_level
from gateway.policy.model import LEVEL
from gateway.principal import Principal
from tests.harness import deploy
from tests.test_approvals import _client

POLICY: dict[str, Any] = {
    "roles": {"reader": {"security_level": "standard", "permissions": {"can_execute_tools": ["*"]}},
              "operator": {"security_level": "critical", "permissions": {"can_execute_tools": ["*"]}}},
    "bindings": [{"when": {"scope": "read"}, "roles": ["reader"]}, {"when": {"scope": "ops"}, "roles": ["operator"]}],
    "tools": {"purge": {"security_level": "low"}},  # the policy has spoken about purge: its annotations are not read
    "authentication_levels": {"default": "critical"},  # every login strong enough: the role's level decides
    "deny_detail": "explain",
}


@pytest.mark.parametrize(("annotations", "level"), [
    ({"destructiveHint": True}, LEVEL["high"]),
    ({"destructiveHint": True, "openWorldHint": True}, LEVEL["high"]),
    ({"openWorldHint": True}, LEVEL["standard"]),
    ({"destructiveHint": False, "openWorldHint": False}, 0),
    ({"destructiveHint": "true"}, 0),  # only a JSON true says it
    ({}, 0),
    (None, 0),
    (["destructiveHint"], 0),
])
def test_the_level_annotations_ask_for(annotations: object, level: int) -> None:
    assert annotation_level(annotations) == level


@pytest.mark.parametrize(("scope", "tool", "hinted", "allowed", "reason"), [
    ("read", "wipe", LEVEL["high"], False, "level:role<high"),
    ("ops", "wipe", LEVEL["high"], True, "role:operator:tool"),
    ("read", "browse", LEVEL["standard"], True, "role:reader:tool"),
    ("read", "purge", LEVEL["critical"], True, "role:reader:tool"),  # named by the policy: no raising
    ("read", "note", 0, True, "role:reader:tool"),
])
def test_annotations_raise_only_what_the_policy_leaves_unsaid(tmp_path: Path, scope: str, tool: str, hinted: int,
                                                               allowed: bool, reason: str) -> None:
    policy = parse_policy(POLICY, b"", tmp_path / "p.yaml")
    decision = decide(Principal("ann", "https://gw", scopes=frozenset({scope})),
                      Operation("tool_call", "tools/call", 1, name=tool, arguments={}), policy, hinted)
    assert (decision.allowed, decision.reason) == (allowed, reason)


def _server() -> MCPServer:
    server = MCPServer("annotated")

    @server.tool(annotations=types.ToolAnnotations(destructiveHint=True))
    def wipe(target: str) -> str:
        return f"wiped {target}"

    @server.tool(annotations=types.ToolAnnotations(openWorldHint=True, destructiveHint=False))
    def browse(url: str) -> str:
        return f"fetched {url}"

    return server


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_a_destructive_tool_needs_a_high_role_when_the_policy_says_nothing_of_it(
        tmp_path: Path, era: str) -> None:
    gateway = deploy("proxy", tmp_path, upstream_app=_server().streamable_http_app(), policy=POLICY)
    try:
        async with _client(gateway, era, gateway.token("rae", scopes=("read",))) as reader:
            listed = {t.name for t in (await reader.list_tools()).tools}
            assert listed == {"browse"}  # the destructive tool is beyond the reader's level: not listed
            fetched = await reader.call_tool("browse", {"url": "https://example.com"})
            assert fetched.content[0].text == "fetched https://example.com"  # type: ignore[union-attr]
            with pytest.raises(MCPError) as refused:
                await reader.call_tool("wipe", {"target": "/srv"})
            assert "level:role<high" in refused.value.error.message
        async with _client(gateway, era, gateway.token("oz", scopes=("ops",))) as operator:
            await operator.list_tools()
            wiped = await operator.call_tool("wipe", {"target": "/tmp/x"})
            assert wiped.content[0].text == "wiped /tmp/x"  # type: ignore[union-attr]
        assert [c["params"]["arguments"] for c in gateway.recorder.tool_calls("wipe")] == [{"target": "/tmp/x"}]
        denied = [(e["user_id"], e["reason"]) for e in gateway.audit_events()
                  if e["operation"] == "tools/call" and e["result"] == "denied"]
        assert denied == [("rae", "level:role<high")]
    finally:
        gateway.stop()
