"""Argument constraints in the policy: what a role may call a tool *with*.

Decisions as tables (a grant's constraints, a tool's constraints for every role, lists, the decision cache);
the policy file's problems; the lint of constraints against a tool's inputSchema; and end to end with the SDK
client, in front of npm server-filesystem (stdio: paths inside and outside what the policy allows, a traversal)
and the SDK's demo server (ranges, sets, expressions, both eras). Every refusal is audited with the argument and
the rule, and never reaches the upstream.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from gateway.mcp import Operation
from gateway.policy import PolicyError, decide, parse_policy
from gateway.policy.engine import DecisionCache
from gateway.policy.lint import schema_lint
from gateway.principal import Principal
from tests.harness import DEFAULT_POLICY, NODE22, Deployment, deploy
from tests.test_approvals import _client
from tests.test_stdio import StdioGateway, text
from tests.test_stdio_peers import FILESYSTEM

DOCS = {"kind": "path", "within": ["/srv/docs/**"]}
POLICY: dict[str, Any] = {
    "roles": {
        "reader": {"permissions": {"can_execute_tools": [{"name": "read_*", "arguments": {"path": DOCS}}, "search"]}},
        "archivist": {"permissions": {"can_execute_tools": ["read_file"]}},
        "operator": {"permissions": {"can_execute_tools": ["*"]}},
    },
    "bindings": [{"when": {"scope": "read"}, "roles": ["reader"]},
                 {"when": {"scope": "archive"}, "roles": ["archivist"]},
                 {"when": {"scope": "ops"}, "roles": ["operator"]}],
    "tools": {"fetch": {"arguments": {"url": {"kind": "url", "hosts": ["*.example.com"], "schemes": ["https"]}}},
              "run_query": {"arguments": {"sql": {"max_length": 50, "not_matches": ["(?i)\\bdrop\\b"]},
                                          "limit": {"range": [1, 1000], "optional": True}}}},
    "deny_detail": "explain",
}


def _policy(raw: dict[str, Any] = POLICY, tmp: Path = Path("/tmp/policy.yaml")) -> Any:
    return parse_policy(raw, b"", tmp)


def _call(name: str, **arguments: Any) -> Operation:
    return Operation("tool_call", "tools/call", 1, name=name, arguments=arguments)


@pytest.mark.parametrize(("scopes", "tool", "arguments", "allowed", "reason"), [
    ({"read"}, "read_file", {"path": "/srv/docs/a.txt"}, True, "role:reader:tool"),
    ({"read"}, "read_file", {"path": "/srv/docs/sub/../b.txt"}, True, "role:reader:tool"),
    ({"read"}, "read_file", {"path": "/etc/shadow"}, False, "argument:path:within"),
    ({"read"}, "read_file", {"path": "/srv/docs/../../etc/shadow"}, False, "argument:path:within"),
    ({"read"}, "read_file", {"path": "/srv/docs/../../../../etc/shadow"}, False, "argument:path:path"),
    ({"read"}, "read_file", {"path": "/srv/docs/%2e%2e/x"}, False, "argument:path:path"),  # escapes: refused
    ({"read"}, "read_file", {}, False, "argument:path:missing"),
    ({"read"}, "read_file", {"path": 7}, False, "argument:path:type"),
    ({"read"}, "search", {"query": "anything"}, True, "role:reader:tool"),  # an unconstrained grant
    ({"read", "archive"}, "read_file", {"path": "/etc/hosts"}, True, "role:archivist:tool"),  # another grant holds
    ({"ops"}, "fetch", {"url": "https://api.example.com/x"}, True, "role:operator:tool"),
    ({"ops"}, "fetch", {"url": "http://api.example.com/x"}, False, "argument:url:schemes"),  # for every role
    ({"ops"}, "fetch", {"url": "https://example.com.evil.test/"}, False, "argument:url:hosts"),
    ({"ops"}, "fetch", {"url": "https://api.example.com@evil.test/"}, False, "argument:url:url"),
    ({"ops"}, "run_query", {"sql": "select 1", "limit": 10}, True, "role:operator:tool"),
    ({"ops"}, "run_query", {"sql": "select 1; DROP table x"}, False, "argument:sql:not_matches"),
    ({"ops"}, "run_query", {"sql": "select 1", "limit": 0}, False, "argument:limit:range"),
    ({"ops"}, "run_query", {"sql": "x" * 51}, False, "argument:sql:max_length"),
])
def test_a_call_needs_a_grant_whose_constraints_all_hold(scopes: set[str], tool: str, arguments: dict[str, Any],
                                                         allowed: bool, reason: str) -> None:
    decision = decide(Principal("alice", "https://gw", scopes=frozenset(scopes)), _call(tool, **arguments), _policy())
    assert (decision.allowed, decision.reason) == (allowed, reason)
    assert decision.hidden is False or allowed  # refused for its arguments, the tool is not hidden
    if not allowed:
        assert decision.detail  # in words, for deny_detail: explain


def test_a_tool_gated_by_constraints_stays_listed_for_roles_that_may_call_it_with_some_arguments() -> None:
    item = Operation("tool_call", "tools/list", name="read_file")
    assert decide(Principal("alice", "https://gw", scopes=frozenset({"read"})), item, _policy()).visible
    assert not decide(Principal("alice", "https://gw", scopes=frozenset({"read"})),
                      Operation("tool_call", "tools/list", name="delete_file"), _policy()).visible


def test_the_decision_cache_never_answers_one_argument_set_with_another() -> None:
    cache, policy = DecisionCache(), _policy()
    alice = Principal("alice", "https://gw", scopes=frozenset({"read"}))
    assert cache(alice, _call("read_file", path="/srv/docs/a"), policy).allowed
    assert not cache(alice, _call("read_file", path="/etc/passwd"), policy).allowed
    assert cache(alice, _call("read_file", path="/srv/docs/a"), policy).allowed


@pytest.mark.parametrize(("tools", "roles", "problem"), [
    ({"x": {"arguments": {"q": {"matches": ["(unclosed"]}}}}, {}, "(unclosed"),
    ({"x": {"arguments": {"q": {"within": ["/a/**"]}}}}, {}, "within"),
    ({"x": {"arguments": {"q": {}}}}, {}, "operator"),
    ({}, {"r": {"permissions": {"can_execute_tools": [{"name": "x", "arguments": {}}]}}}, "arguments"),
])
def test_a_bad_constraint_is_a_policy_problem_naming_its_key(tools: dict[str, Any], roles: dict[str, Any],
                                                             problem: str, tmp_path: Path) -> None:
    raw = {"roles": {"base": {}, **roles}, "tools": tools}
    with pytest.raises(PolicyError) as failed:
        _policy(raw, tmp_path / "p.yaml")
    assert problem in "\n".join(failed.value.problems)


def test_constraints_on_prompts_or_resources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as failed:
        _policy({"roles": {"r": {}}, "prompts": {"p": {"arguments": {"a": {"equals": 1}}}}}, tmp_path / "p.yaml")
    assert "argument constraints are for tools only" in "\n".join(failed.value.problems)


def test_lint_names_the_file_key_and_why_for_a_constraint_the_schema_does_not_bear() -> None:
    schema = {"type": "object", "properties": {"sql": {"type": "string"}, "limit": {"type": "string"}}}
    problems = schema_lint(_policy(), "run_query", schema)
    assert problems == [
        "/tmp/policy.yaml: tools.run_query.arguments.limit: range needs a number, the schema says string "
        "(tool run_query)"]
    assert schema_lint(_policy(), "read_file", {"type": "object", "properties": {"file": {"type": "string"}}}) == [
        '/tmp/policy.yaml: roles.reader.permissions.can_execute_tools.0.arguments.path: the tool\'s inputSchema has '
        'no property "path" (tool read_file)']


async def test_server_filesystem_reads_only_where_the_policy_allows_whatever_the_server_would(tmp_path: Path) -> None:
    docs, secret = tmp_path / "docs", tmp_path / "secret"
    docs.mkdir()
    secret.mkdir()
    (docs / "readme.txt").write_text("hello from the docs")
    (secret / "key.txt").write_text("the secret")
    within = {"path": {"kind": "path", "within": [f"{docs}/**"]}}
    gateway = StdioGateway(tmp_path, command=[str(NODE22), str(FILESYSTEM), str(tmp_path)],  # it may read it all
                           roles={"reader": {"permissions": {"can_execute_tools": [
                               {"name": "read_text_file", "arguments": within}, "list_allowed_directories"]}}})
    try:
        async with gateway.client() as session:
            assert "read_text_file" in {t.name for t in (await session.list_tools()).tools}
            read = await session.call_tool("read_text_file", {"path": str(docs / "readme.txt")})
            assert text(read) == "hello from the docs"
            for path in (str(secret / "key.txt"), f"{docs}/../secret/key.txt", f"{docs}/%2e%2e/secret/key.txt"):
                with pytest.raises(MCPError) as refused:
                    await session.call_tool("read_text_file", {"path": path})
                assert refused.value.error.code == -32011
                assert "the secret" not in str(refused.value.error.message)
        calls = [(e["result"], e["reason"]) for e in gateway.audit()
                 if e["tool_executed"] == "read_text_file" and e["operation"] == "tools/call"]
        assert calls == [("allowed", "role:reader:tool"), ("denied", "argument:path:within"),
                         ("denied", "argument:path:within"), ("denied", "argument:path:path")]  # %2e: refused
    finally:
        gateway.stop()


DEMO = {
    "roles": {**DEFAULT_POLICY["roles"], "forecaster": {"permissions": {"can_execute_tools": [
        {"name": "get_forecast", "arguments": {"days": {"range": [1, 7]}, "region": {"in": ["north", "south"]}}},
        {"name": "search", "arguments": {"query": {"not_matches": ["(?i)password"], "max_length": 100},
                                         "page": {"range": [1, 10]}}}]}}},
    "bindings": [{"when": {"scope": "forecast"}, "roles": ["forecaster"]}],
    "deny_detail": "explain",
}


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_ranges_sets_and_expressions_hold_end_to_end_and_say_which_argument_failed(
        tmp_path: Path, era: str, caplog: pytest.LogCaptureFixture) -> None:
    gateway: Deployment = deploy("proxy", tmp_path, policy=DEMO)
    try:
        token = gateway.token("fran", scopes=("forecast",))
        with caplog.at_level(logging.WARNING, logger="gateway.policy.lint"):
            async with _client(gateway, era, token) as session:
                listed = {t.name for t in (await session.list_tools()).tools}
                assert {"get_forecast", "search"} <= listed  # listed: callable with some arguments
                ok = await session.call_tool("get_forecast", {"region": "north", "days": 3})
                assert "north" in ok.content[0].text  # type: ignore[union-attr]
                for arguments, rule in (({"region": "north", "days": 30}, "days:range"),
                                        ({"region": "east", "days": 1}, "region:in")):
                    with pytest.raises(MCPError) as refused:
                        await session.call_tool("get_forecast", arguments)
                    assert refused.value.error.code == -32011 and f"argument:{rule}" in refused.value.error.message
        assert len(gateway.recorder.tool_calls("get_forecast")) == 1
        denied = [e["reason"] for e in gateway.audit_events() if e["result"] == "denied"]
        assert denied == ["argument:days:range", "argument:region:in"]
        # the policy constrains `page`, which the demo server's search does not have: said once, by file and key
        lint = [r.getMessage() for r in caplog.records if "search" in r.getMessage()]
        assert lint == [f'{gateway.runtime.policy.source}: roles.forecaster.permissions.can_execute_tools.1.arguments'
                        f'.page: the tool\'s inputSchema has no property "page" (tool search) (upstream demo)']
    finally:
        gateway.stop()


def test_policy_lint_asks_each_upstream_itself_and_names_every_mistake(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from gateway import cli
    from tests.harness import Recorder, ServerThread, build_server, write_config

    upstream = ServerThread(Recorder(build_server().streamable_http_app())).start()
    docs = tmp_path / "docs"
    docs.mkdir()
    try:
        demo = write_config(tmp_path, f"{upstream.url}/mcp", policy=DEMO)
        assert cli.main(["policy", "lint", "--config", str(demo)]) == 1
        printed = capsys.readouterr().out.splitlines()
        assert printed == [f'{tmp_path / "policy.yaml"}: roles.forecaster.permissions.can_execute_tools.1.arguments'
                           f'.page: the tool\'s inputSchema has no property "page" (tool search) (upstream demo)']
        clean = {**DEMO, "roles": {"r": {"permissions": {"can_execute_tools": [
            {"name": "get_forecast", "arguments": {"days": {"range": [1, 7]}}}]}}}, "bindings": []}
        (tmp_path / "clean").mkdir()
        assert cli.main(["policy", "lint", "--config", str(write_config(tmp_path / "clean", f"{upstream.url}/mcp",
                                                                        policy=clean))]) == 0
        # a stdio upstream: the program run, asked and stopped by the command itself
        (tmp_path / "stdio").mkdir()
        stdio = StdioGateway.write(tmp_path / "stdio", 1,
                                   [str(NODE22), str(FILESYSTEM), str(docs)], {}, roles={"reader": {"permissions": {
                                       "can_execute_tools": [{"name": "read_text_file", "arguments": {
                                           "file": {"kind": "path", "within": [f"{docs}/**"]}}}]}}})
        assert cli.main(["policy", "lint", "--config", str(stdio), "--upstream", "kit"]) == 1
        assert 'has no property "file" (tool read_text_file) (upstream kit)' in capsys.readouterr().out
    finally:
        upstream.stop()
