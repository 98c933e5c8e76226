"""Rules that hold on one upstream: the policy's `upstreams:` section.

A grant or a requirement under `upstreams.NAME` holds on that upstream only, added to the rules at the top level,
which hold on every upstream. As a table of decisions on each upstream's view of one policy; the policy's and the
config's problems; end to end with one gateway in front of two upstreams that both offer a tool `delete`; and the
commands that show it: `policy lint` (a grant matching tools of several upstreams, a name that looks like a shell
pattern), `tools list --live` (what each upstream offers and what the policy makes of it, no gateway running),
`policy test` and `policy explain` (decided on one upstream's view).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

from gateway import cli, create_app
from gateway.config import ConfigError, load_config
from gateway.policy import Policy, PolicyError, decide, load_policy
from gateway.policy.explain import operation_for, principal_from
from gateway.runtime import Runtime
from tests.harness import Recorder, ServerThread, audit_events, free_port, write_config

READER = {"scope": "read"}
EDITOR = {"scope": "edit"}  # inherits reader
ADMIN = {"groups": ["ops"]}  # every tool, at level critical; logs in at the default level (standard)
WRITE_IN_A = {"name": "write", "arguments": {"path": {"kind": "path", "within": ["/srv/a/**"]}}}

POLICY: dict[str, Any] = {
    "roles": {
        "reader": {"permissions": {"can_execute_tools": ["echo", "search"],
                                   "can_read_resources": ["file:///srv/docs/*"]}},
        "editor": {"inherits": ["reader"]},
        "admin": {"security_level": "critical", "permissions": {"can_execute_tools": ["*"]}},
    },
    "bindings": [{"when": {"scope": "read"}, "roles": ["reader"]}, {"when": {"scope": "edit"}, "roles": ["editor"]},
                 {"when": {"claim": {"groups": "ops"}}, "roles": ["admin"]}],
    "tools": {"search": {"security_level": "low"}},
    "upstreams": {
        "a": {
            "roles": {"reader": {"can_execute_tools": ["delete", WRITE_IN_A], "can_read_resources": ["file:///srv/a/**"],
                                 "can_access_prompts": ["summarize"]}},
            "tools": {"search": {"security_level": "critical"},  # stricter than the top level's: the stricter holds
                      "echo": {"arguments": {"text": {"max_length": 5}}}},
        },
        "b": {"roles": {"editor": {"can_execute_tools": ["publish"]}}},
    },
}

# the views a row is decided on: an upstream's, or None, the policy as it holds on every upstream
ELSEWHERE = ["b", None]


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("scope") / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    return load_policy(path)


def _decided(policy: Policy, upstream: str | None, who: dict[str, Any], method: str, target: str,
             arguments: dict[str, Any] | None = None) -> tuple[str, str]:
    view = policy if upstream is None else policy.for_upstream(upstream)
    is_uri = method == "resources/read"
    operation = operation_for(method, None if is_uri else target, target if is_uri else None)
    if arguments is not None:
        operation = replace(operation, arguments=arguments)
    decision = decide(principal_from(who), operation, view)
    return decision.outcome, decision.reason


@pytest.mark.parametrize(("upstreams", "who", "method", "target", "arguments", "outcome", "reason"), [
    # a grant under upstreams.a holds on a, and nowhere else
    (["a"], READER, "tools/call", "delete", {}, "allowed", "role:reader:tool"),
    (ELSEWHERE, READER, "tools/call", "delete", {}, "denied", "no-grant:tool"),
    # the top level's grants hold on every upstream, a's too
    (["a", "b", None], READER, "tools/call", "echo", {"text": "hi"}, "allowed", "role:reader:tool"),
    # inherited like any other grant: an editor is a reader, on a as well
    (["a"], EDITOR, "tools/call", "delete", {}, "allowed", "role:editor:tool"),
    (ELSEWHERE, EDITOR, "tools/call", "delete", {}, "denied", "no-grant:tool"),
    (["b"], EDITOR, "tools/call", "publish", {}, "allowed", "role:editor:tool"),
    (["a", None], EDITOR, "tools/call", "publish", {}, "denied", "no-grant:tool"),
    (["b"], READER, "tools/call", "publish", {}, "insufficient_scope", "no-grant:tool"),  # an editor's scope would do
    ([None], READER, "tools/call", "publish", {}, "denied", "no-grant:tool"),  # no scope would
    # a requirement under upstreams.a holds on a only, on top of the top level's
    (["a"], READER, "tools/call", "search", {}, "denied", "level:role<critical"),
    (ELSEWHERE, READER, "tools/call", "search", {}, "allowed", "role:reader:tool"),
    (["a"], ADMIN, "tools/call", "search", {}, "step_up", "level:authentication<critical"),
    (ELSEWHERE, ADMIN, "tools/call", "search", {}, "allowed", "role:admin:tool"),
    (["a"], READER, "tools/call", "echo", {"text": "too long"}, "denied", "argument:text:max_length"),
    (ELSEWHERE, READER, "tools/call", "echo", {"text": "too long"}, "allowed", "role:reader:tool"),
    # a grant with argument constraints under upstreams.a
    (["a"], READER, "tools/call", "write", {"path": "/srv/a/notes.txt"}, "allowed", "role:reader:tool"),
    (["a"], READER, "tools/call", "write", {"path": "/srv/a/../b/notes.txt"}, "denied", "argument:path:within"),
    (["a"], EDITOR, "tools/call", "write", {"path": "/etc/passwd"}, "denied", "argument:path:within"),
    (ELSEWHERE, READER, "tools/call", "write", {"path": "/srv/a/notes.txt"}, "denied", "no-grant:tool"),
    # resources and prompts
    (["a"], READER, "resources/read", "file:///srv/a/deep/x", None, "allowed", "role:reader:resource"),
    (ELSEWHERE, READER, "resources/read", "file:///srv/a/deep/x", None, "denied", "no-grant:resource"),
    (["a", "b", None], READER, "resources/read", "file:///srv/docs/readme", None, "allowed", "role:reader:resource"),
    (["a"], EDITOR, "prompts/get", "summarize", None, "allowed", "role:editor:prompt"),
    (ELSEWHERE, READER, "prompts/get", "summarize", None, "denied", "no-grant:prompt"),
])
def test_rules_under_an_upstream_hold_on_that_upstream_only(
        policy: Policy, upstreams: list[str | None], who: dict[str, Any], method: str, target: str,
        arguments: dict[str, Any] | None, outcome: str, reason: str) -> None:
    for upstream in upstreams:
        assert _decided(policy, upstream, who, method, target, arguments) == (outcome, reason), upstream


def test_an_upstream_the_section_does_not_name_sees_the_top_level_rules(policy: Policy) -> None:
    assert policy.for_upstream("c") is policy
    assert policy.for_upstream("a") is not policy and policy.for_upstream("b") is not policy


@pytest.mark.parametrize(("section", "problem"), [
    ({"a": {"roles": {"ghost": {"can_execute_tools": ["delete"]}}}},
     "(top level): upstreams.a.roles names unknown role 'ghost'"),
    ({"a": {"resources": {"file:///srv/*": {"approval": {"approvers": ["role:reader"]}}}}},
     "(top level): upstreams.a.resources.file:///srv/*.approval: approvals are for tools only"),
    ({"a": {"prompts": {"summarize": {"arguments": {"text": {"max_length": 5}}}}}},
     "(top level): upstreams.a.prompts.summarize.arguments: argument constraints are for tools only"),
    ({"a": {"tools": {"delete": {"approval": {"approvers": ["role:ghost"]}}}}},
     "(top level): upstreams.a.tools.delete.approval.approvers names unknown role 'ghost'"),
    ({"a b": {}}, "upstreams.a b.[key]: String should match pattern '^[A-Za-z0-9_.-]+$'"),
    ({"a": {"roles": {"reader": {"can_list_resources": True}}}},
     "upstreams.a.roles.reader.can_list_resources: unknown key"),  # a section grants names, not features
    ({"a": {"bindings": []}}, "upstreams.a.bindings: unknown key"),
])
def test_a_bad_upstreams_section_is_a_policy_problem_naming_its_key(tmp_path: Path, section: dict[str, Any],
                                                                   problem: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"roles": {"reader": {}}, "upstreams": section}))
    with pytest.raises(PolicyError) as invalid:
        load_policy(path)
    assert invalid.value.problems == [f"{path}: {problem}"]


# ---- one gateway, two upstreams with a tool of the same name ---------------------------------------------------

SCOPED: dict[str, Any] = {
    "roles": {"reader": {"permissions": {"can_execute_tools": ["echo"]}}},
    "bindings": [{"when": {"scope": "read"}, "roles": ["reader"]}],
    # delete says destructiveHint, which asks for level high where the policy names no rule for it: on a it does
    "upstreams": {"a": {"roles": {"reader": {"can_execute_tools": ["delete"]}},
                        "tools": {"delete": {"security_level": "standard"}}}},
}
UNSCOPED: dict[str, Any] = {  # the same grant, meant for a but written for every upstream
    "roles": {"reader": {"permissions": {"can_execute_tools": ["echo", "delete"]}}},
    "bindings": [{"when": {"scope": "read"}, "roles": ["reader"]}],
    "tools": {"delete": {"security_level": "high"}},  # stricter on every upstream: what a top-level rule is for
}


def _server(name: str) -> MCPServer:
    server = MCPServer(name)

    @server.tool(annotations=types.ToolAnnotations(destructiveHint=True))
    def delete(path: str) -> str:
        """Delete a file."""
        return f"{name} deleted {path}"

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return f"{name}: {text}"

    return server


def _config(directory: Path, policy: dict[str, Any], urls: dict[str, str], **overrides: Any) -> Path:
    """A gateway config mounting each upstream of `urls` (name -> URL) at /NAME, with `policy`."""
    directory.mkdir(exist_ok=True)
    return write_config(directory, None, policy=policy, **overrides,
                        upstreams=[{"name": name, "path": f"/{name}", "url": url} for name, url in urls.items()])


@dataclass
class Upstreams:
    """Upstreams a and b, each a real SDK server on its own port, every request to it recorded."""

    servers: dict[str, ServerThread]
    recorders: dict[str, Recorder]

    @property
    def urls(self) -> dict[str, str]:
        return {name: f"{server.url}/mcp" for name, server in self.servers.items()}


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    recorders = {name: Recorder(_server(name).streamable_http_app()) for name in ("a", "b")}
    servers = {name: ServerThread(recorder).start() for name, recorder in recorders.items()}
    yield Upstreams(servers, recorders)
    for server in servers.values():
        server.stop()


@dataclass
class Gateway:
    server: ServerThread
    runtime: Runtime

    def client(self, upstream: str, era: str, scopes: tuple[str, ...] = ("read",)) -> Client:
        """The SDK client on `upstream`'s path, with a token for it."""
        config = self.runtime.config
        target = next(u for u in config.upstreams if u.name == upstream)
        token = self.runtime.authenticator.issue_token(subject="rae", audience=config.resource_url(target),
                                                       scopes=scopes)
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
        return Client(streamable_http_client(f"{self.server.url}{target.path}", http_client=http), mode=era)


@pytest.fixture
def gateway(upstreams: Upstreams, tmp_path: Path) -> Iterator[Gateway]:
    port = free_port()
    app: Any = create_app(_config(tmp_path, SCOPED, upstreams.urls, public_url=f"http://127.0.0.1:{port}"))
    server = ServerThread(app, port).start()
    yield Gateway(server, app.runtime)
    server.stop()


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_a_tool_granted_on_one_upstream_is_listed_and_called_there_and_refused_on_the_other(
        upstreams: Upstreams, gateway: Gateway, era: str) -> None:
    async with gateway.client("a", era) as on_a:
        assert {t.name for t in (await on_a.list_tools()).tools} == {"delete", "echo"}
        deleted = await on_a.call_tool("delete", {"path": "/srv/a/old"})
        assert deleted.content[0].text == "a deleted /srv/a/old"  # type: ignore[union-attr]
    async with gateway.client("b", era) as on_b:
        assert {t.name for t in (await on_b.list_tools()).tools} == {"echo"}
        echoed = await on_b.call_tool("echo", {"text": "hi"})
        assert echoed.content[0].text == "b: hi"  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await on_b.call_tool("delete", {"path": "/srv/b/old"})
        assert refused.value.error.code == -32602  # hidden: answered as b answers for a tool it does not have
    assert [c["params"]["arguments"] for c in upstreams.recorders["a"].tool_calls("delete")] == [{"path": "/srv/a/old"}]
    assert upstreams.recorders["b"].tool_calls("delete") == []
    calls = [(e["upstream"], e["tool_executed"], e["result"], e["rule"])
             for e in audit_events(gateway.server, gateway.runtime) if e["operation"] == "tools/call"]
    assert calls == [("a", "delete", "allowed", "role:reader:tool"), ("b", "echo", "allowed", "role:reader:tool"),
                     ("b", "delete", "denied", "no-grant:tool")]


def test_a_section_naming_an_upstream_the_config_does_not_have_is_a_config_error(tmp_path: Path) -> None:
    typo = {**SCOPED, "upstreams": {"a": SCOPED["upstreams"]["a"], "c": {}}}
    urls = {"a": "http://127.0.0.1:9001/mcp", "b": "http://127.0.0.1:9002/mcp"}
    with pytest.raises(ConfigError) as invalid:
        load_config(_config(tmp_path, typo, urls))
    assert invalid.value.problems == [
        f"{tmp_path / 'gateway.yaml'}: (top level): the policy's upstreams: section names c, not an upstream of "
        f"this config (have: a, b)"]


def test_a_reload_naming_an_upstream_the_config_does_not_have_is_refused_and_the_policy_in_force_stays(
        tmp_path: Path) -> None:
    urls = {"a": "http://127.0.0.1:9001/mcp", "b": "http://127.0.0.1:9002/mcp"}
    runtime = Runtime(load_config(_config(tmp_path, SCOPED, urls)))
    before = runtime.policy
    # a typo would leave a without its stricter rule, silently: refused as an invalid policy
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(
        {**SCOPED, "upstreams": {"fles": {"tools": {"echo": {"security_level": "critical"}}}}}))
    assert runtime.reload_policy() is False
    assert runtime.policy is before
    assert runtime.metrics.policy_reloads.labels("invalid")._value.get() == 1


# ---- the commands -------------------------------------------------------------------------------------------------

def _warnings(out: str) -> list[str]:
    return [line.removeprefix("warning: ") for line in out.splitlines() if line.startswith("warning: ")]


def _on_both(source: Path, key: str, tool: str) -> str:
    return (f"{source}: {key}: {tool!r} matches tools of 2 upstreams (a: {tool}; b: {tool}): if it is meant for one, "
            f"grant it under upstreams.NAME instead")


def test_lint_warns_of_a_top_level_grant_matching_tools_of_both_upstreams_not_of_one_under_upstreams_a(
        upstreams: Upstreams, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grants = "roles.reader.permissions.can_execute_tools"
    unscoped = _config(tmp_path / "unscoped", UNSCOPED, upstreams.urls)
    assert cli.main(["policy", "lint", "--config", str(unscoped)]) == 0  # warnings only
    source = tmp_path / "unscoped" / "policy.yaml"
    assert _warnings(capsys.readouterr().out) == [_on_both(source, f"{grants}.0", "echo"),
                                                  _on_both(source, f"{grants}.1", "delete")]
    scoped = _config(tmp_path / "scoped", SCOPED, upstreams.urls)
    assert cli.main(["policy", "lint", "--config", str(scoped)]) == 0
    # echo, granted at the top level, is still named: the lint cannot tell a grant meant for every upstream
    assert _warnings(capsys.readouterr().out) == [_on_both(tmp_path / "scoped" / "policy.yaml", f"{grants}.0", "echo")]
    # with one upstream asked, no name can match tools of two
    assert cli.main(["policy", "lint", "--config", str(unscoped), "--upstream", "a"]) == 0
    assert _warnings(capsys.readouterr().out) == []


def test_lint_warns_of_a_name_that_looks_like_a_shell_pattern_and_so_does_the_gateway_as_it_loads(
        upstreams: Upstreams, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    shell = {"roles": {"reader": {"permissions": {"can_execute_tools": ["ech?", "delete*"],
                                                  "can_access_prompts": ["get-{a,b}"]}}},
             "tools": {"[de]*": {"security_level": "high"}},
             "upstreams": {"a": {"roles": {"reader": {"can_execute_tools": ["del?"]}}, "prompts": {"p{1}": {}}}}}
    config = _config(tmp_path, shell, upstreams.urls)
    assert cli.main(["policy", "lint", "--config", str(config), "--upstream", "a"]) == 0
    source = tmp_path / "policy.yaml"
    why = "looks like a shell pattern, but only * and ** are wildcards: it matches the"
    expected = [
        f"{source}: tools.[de]*: '[de]*' {why} tool named exactly that",
        f"{source}: roles.reader.permissions.can_execute_tools.0: 'ech?' {why} tool named exactly that",
        f"{source}: roles.reader.permissions.can_access_prompts.0: 'get-{{a,b}}' {why} prompt named exactly that",
        f"{source}: upstreams.a.prompts.p{{1}}: 'p{{1}}' {why} prompt named exactly that",
        f"{source}: upstreams.a.roles.reader.can_execute_tools.0: 'del?' {why} tool named exactly that",
    ]
    assert sorted(_warnings(capsys.readouterr().out)) == sorted(expected)
    with caplog.at_level(logging.WARNING, logger="gateway.policy.lint"):
        create_app(config)
    assert sorted(r.getMessage() for r in caplog.records if r.name == "gateway.policy.lint") == sorted(expected)


def _live(config: Path, capsys: pytest.CaptureFixture[str], *more: str) -> tuple[int, list[dict[str, Any]], str]:
    code = cli.main(["tools", "list", "--config", str(config), "--live", "--format", "json", *more])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_tools_list_live_asks_each_upstream_and_says_what_the_policy_makes_of_each_tool_there(
        upstreams: Upstreams, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, SCOPED, upstreams.urls)  # no gateway runs: the command asks the upstreams itself
    code, rows, _ = _live(config, capsys)
    assert code == 0
    seen = {(r["upstream"], r["tool"]): (r["level"], r["roles"], r["hints"], r["arguments_constrained"])
            for r in rows}
    assert seen == {
        ("a", "delete"): ("standard", ["reader"], ["destructiveHint"], False),  # the policy's rule on a
        ("a", "echo"): ("low", ["reader"], [], False),
        ("b", "delete"): ("high", [], ["destructiveHint"], False),  # no rule on b: the hint's level
        ("b", "echo"): ("low", ["reader"], [], False),
    }
    assert {r["description"] for r in rows if r["tool"] == "delete"} == {"Delete a file."}
    code, rows, _ = _live(config, capsys, "--upstream", "b")
    assert code == 0 and {(r["upstream"], r["tool"]) for r in rows} == {("b", "delete"), ("b", "echo")}


def test_tools_list_live_says_which_upstream_cannot_be_asked_and_exits_1(
        upstreams: Upstreams, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, SCOPED, {**upstreams.urls, "b": f"http://127.0.0.1:{free_port()}/mcp"})  # nobody there
    code, rows, err = _live(config, capsys)
    assert code == 1
    assert {(r["upstream"], r["tool"]) for r in rows} == {("a", "delete"), ("a", "echo")}  # a is still shown
    assert err.startswith("upstream b: cannot list its tools: ")
    assert cli.main(["tools", "list", "--config", str(config), "--live", "--upstream", "c"]) == 2
    assert capsys.readouterr().err.strip() == "--upstream: one of a, b"


def test_policy_test_decides_a_case_on_the_upstream_it_names(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "scoped.yaml"
    policy.write_text(yaml.safe_dump(SCOPED))
    cases = tmp_path / "scoped.tests.yaml"
    on_a = {"name": "a reader may delete on a", "claims": {"sub": "rae", "scope": "read"}, "method": "tools/call",
            "tool": "delete", "upstream": "a", "expect": "allowed", "reason": "role:reader:tool"}
    on_b = {**on_a, "name": "but not on b", "upstream": "b", "expect": "denied", "reason": "no-grant:tool"}
    cases.write_text(yaml.safe_dump({"cases": [on_a, on_b]}))
    assert cli.main(["policy", "test", str(policy)]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["PASS  a reader may delete on a", "PASS  but not on b"]
    anywhere = {key: value for key, value in on_a.items() if key != "upstream"} | {"name": "a reader may delete"}
    cases.write_text(yaml.safe_dump({"cases": [on_a, anywhere]}))
    assert cli.main(["policy", "test", str(policy)]) == 1
    assert capsys.readouterr().out.splitlines()[:2] == [
        "PASS  a reader may delete on a", "FAIL  a reader may delete  (got denied (no-grant:tool))"]


def test_policy_explain_decides_on_the_upstream_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, claims = tmp_path / "scoped.yaml", tmp_path / "claims.json"
    policy.write_text(yaml.safe_dump(SCOPED))
    claims.write_text(json.dumps({"sub": "rae", "scope": "read"}))
    asked = ["policy", "explain", "--policy", str(policy), "--claims", str(claims), "--method", "tools/call",
             "--name", "delete"]
    for upstream, decision, rule in (("a", "allowed", "role:reader:tool"), ("b", "denied (hidden)", "no-grant:tool"),
                                     (None, "denied (hidden)", "no-grant:tool")):
        assert cli.main(asked + (["--upstream", upstream] if upstream else [])) == 0
        lines = capsys.readouterr().out.splitlines()
        assert (lines[0], lines[2]) == (f"decision:   {decision}", f"rule:       {rule}"), upstream


INHERITING: dict[str, Any] = {
    "roles": {
        "base": {"permissions": {"can_execute_tools": ["*"]}},
        "intern": {"inherits": ["base"], "permissions": {"can_execute_tools": ["search"]}},
        "heir": {"inherits": ["base"]},
        "dba": {"permissions": {"can_read_resources": ["file:///srv/db/**"]}},
        "junior_dba": {"inherits": ["dba"]},
        "reporting": {"inherits": ["dba"], "permissions": {"can_execute_tools": ["search"]}},
    },
    "bindings": [{"when": {"scope": name}, "roles": [name]}
                 for name in ("base", "intern", "heir", "dba", "junior_dba", "reporting")],
    "upstreams": {"db": {"roles": {"base": {"can_execute_tools": ["drop_table"]},
                                   "dba": {"can_execute_tools": ["vacuum"]}}}},
}


@pytest.mark.parametrize(("role", "tool", "on_db", "elsewhere"), [
    # a role that sets its own list at the top level inherits none of its parents': on an upstream neither
    ("intern", "drop_table", "no-grant:tool", "no-grant:tool"),
    ("intern", "search", "role:intern:tool", "role:intern:tool"),
    ("reporting", "vacuum", "no-grant:tool", "no-grant:tool"),
    # one that sets none inherits them, the upstream's grants with the top level's
    ("heir", "drop_table", "role:heir:tool", "role:heir:tool"),
    ("junior_dba", "vacuum", "role:junior_dba:tool", "no-grant:tool"),
    ("dba", "vacuum", "role:dba:tool", "no-grant:tool"),
])
def test_a_role_inherits_its_parents_grants_on_an_upstream_as_it_does_at_the_top_level(
        tmp_path: Path, role: str, tool: str, on_db: str, elsewhere: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(INHERITING))
    policy = load_policy(path)
    assert _decided(policy, "db", {"scope": role}, "tools/call", tool)[1] == on_db
    assert _decided(policy, "other", {"scope": role}, "tools/call", tool)[1] == elsewhere
    assert _decided(policy, None, {"scope": role}, "tools/call", tool)[1] == elsewhere
