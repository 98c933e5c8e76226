"""Cedar as a second policy language: `policy: {engine: cedar, file: ...}` decides with the same outcomes,
reasons and refusals as a YAML policy. policies/default.cedar is held to default.yaml case by case and over a
grid of callers and operations; load errors name the file and line; @step_up and @mode("audit_only") forbids;
the schema generated from an upstream's tools; and one gateway in front of a real upstream."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import cedarpy
import pytest
import yaml
from mcp.shared.exceptions import MCPError

from gateway import cli, create_app
from gateway.config import ConfigError, load_config
from gateway.mcp import PROTOCOL_KINDS, Operation
from gateway.policy import Decision, DecisionCache, PolicyError, decide, load_policy
from gateway.policy.cedar import load_cedar_policy, user_entity
from gateway.policy.cedar_index import PolicyIndex
from gateway.policy.cedar_schema import ACTIONS, base_schema, tool_schema
from gateway.policy.cedar_source import read_cedar
from gateway.policy.explain import explain, operation_for, principal_from
from gateway.policy.source import reread_policy
from gateway.principal import Principal
from tests.harness import ROOT, Deployment, Recorder, ServerThread, build_server, free_port, write_config
from tests.test_approvals import _client

CEDAR = load_policy(ROOT / "policies" / "default.cedar")
YAML = load_policy(ROOT / "policies" / "default.yaml")

READER = {"sub": "alice", "scope": "mcp:tools"}
OPS = {"sub": "olga", "groups": ["ops"], "amr": ["pwd"]}
OPS_MFA = {**OPS, "amr": ["pwd", "mfa"]}
OPS_HWK = {**OPS, "amr": ["hwk"]}


def _decide(policy: Any, claims: dict[str, Any], method: str, target: str | None = None, hinted: int = 0,
            roles: frozenset[str] = frozenset()) -> Decision:
    name, uri = (None, target) if target is not None and ":" in target else (target, None)
    principal = replace(principal_from(claims), roles=roles)
    return decide(principal, operation_for(method, name, uri), policy, hinted)


@pytest.mark.parametrize(("claims", "method", "target", "hinted", "outcome", "reason"), [
    (READER, "tools/call", "search", 0, "allowed", "role:reader:tool"),
    (READER, "tools/call", "delete_file", 0, "denied", "no-grant:tool"),
    (READER, "tools/call", "get_weather", 1, "allowed", "role:reader:tool"),
    (READER, "tools/call", "get_weather", 2, "denied", "no-grant:tool"),  # beyond the reader's standard level
    ({**READER, "gateway_level": "low"}, "tools/call", "echo", 1, "step_up", "level:authentication<standard"),
    (OPS, "tools/call", "delete_file", 0, "step_up", "level:authentication<critical"),
    (OPS_MFA, "tools/call", "delete_file", 0, "step_up", "level:authentication<critical"),
    (OPS_HWK, "tools/call", "delete_file", 0, "allowed", "role:operator:tool"),
    ({**OPS_HWK, "gateway_level": "high"}, "tools/call", "delete_file", 0, "step_up",
     "level:authentication<critical"),  # a registered client's ceiling caps what a hardware key reaches
    (OPS, "tools/call", "wipe", 2, "step_up", "level:authentication<high"),
    (OPS_MFA, "tools/call", "wipe", 2, "allowed", "role:operator:tool"),
    (OPS, "tools/call", "x/y", 0, "denied", "no-grant:tool"),  # `*` is one segment
    (OPS, "prompts/get", "summarize", 0, "allowed", "role:operator:prompt"),
    (READER, "completion/complete", "summarize", 0, "allowed", "role:reader:prompt"),
    (READER, "resources/read", "file:///srv/docs/readme", 0, "allowed", "role:reader:resource"),
    (READER, "resources/subscribe", "file:///srv/docs/a/b", 0, "denied", "no-grant:resource"),
    (OPS, "resources/read", "file:///srv/docs/a/b", 0, "allowed", "role:operator:resource"),
    (OPS, "resources/read", "file:///srv/docs/secret/k", 0, "step_up", "level:authentication<high"),
    (OPS, "resources/read", "file:///../etc/passwd", 0, "denied", "uri:'..' climbs above the root"),
    ({"sub": "nobody"}, "tools/list", None, 0, "denied", "no-grant:list"),
    ({"sub": "nobody"}, "initialize", None, 0, "allowed", "protocol:initialize"),
    (READER, "resources/templates/list", None, 0, "allowed", "role:reader:list_resources"),
    (READER, "tools/destroy", None, 0, "denied", "unknown_methods:deny"),
    (OPS, "sampling/createMessage", None, 0, "allowed", "role:operator:sampling"),
    (OPS, "roots/list", None, 0, "denied", "no-grant:roots_list"),
])
def test_default_cedar_decides(claims: dict[str, Any], method: str, target: str | None, hinted: int, outcome: str,
                               reason: str) -> None:
    decision = _decide(CEDAR, claims, method, target, hinted)
    assert (decision.outcome, decision.reason) == (outcome, reason)
    assert decision.policy_version == CEDAR.version
    if outcome == "denied" and method in ("tools/call", "resources/read", "resources/subscribe"):
        assert decision.hidden, "a refused target answers as one that does not exist"
    if outcome == "step_up":
        assert decision.required_level == reason.rpartition("<")[2] and not decision.hidden


def test_list_items_resource_uris_and_answers_to_the_server_are_decided_as_what_they_stand_for() -> None:
    reader, operator = principal_from(READER), principal_from(OPS)
    assert decide(reader, Operation("tool_call", "tools/list", name="search"), CEDAR).allowed
    assert not decide(reader, Operation("tool_call", "tools/list", name="delete_file"), CEDAR).visible
    assert decide(operator, Operation("tool_call", "tools/list", name="delete_file"), CEDAR).visible  # step_up
    template = Operation("completion", "resources/templates/list", uri="file:///srv/docs/{name}")
    assert decide(reader, template, CEDAR).allowed
    read = decide(reader, Operation("resource_read", "resources/read", 1, uri="FILE:///srv/docs/%7Ea"), CEDAR)
    assert (read.allowed, read.uri) == (True, "file:///srv/docs/~a")
    answered = Operation("tool_call", "tools/call", 1, name="search", input_responses=("sampling",))
    assert decide(reader, answered, CEDAR).reason == "input_response:sampling"
    assert decide(principal_from(OPS_HWK), answered, CEDAR).allowed
    # roles given directly (the authenticator's, a runtime assignment) are principal.roles
    assert _decide(CEDAR, {"sub": "anon"}, "tools/call", "echo", roles=frozenset({"reader"})).allowed


def _grid() -> list[tuple[dict[str, Any], frozenset[str], Operation, int]]:
    callers = [{}, {"scope": "mcp:read"}, {"scope": "mcp:tools other"}, {"scope": "other"}, {"groups": "ops"},
               {"groups": ["dev", "ops"]}, {"groups": ["dev"]}, {"groups": "ops", "amr": ["mfa"]},
               {"groups": ["ops"], "amr": ["hwk"]}, {"groups": ["ops"], "amr": ["hwk"], "gateway_level": "high"},
               {"scope": "mcp:read", "gateway_level": "low"}, {"groups": "ops", "scope": "mcp:read", "amr": ["mfa"]},
               {"groups": True}, {"groups": ["ops"], "gateway_level": "low", "amr": ["hwk"]}]
    roles = [frozenset(), frozenset({"reader"}), frozenset({"operator"}), frozenset({"guest"})]
    tools = ["search", "echo", "get_weather", "get_a/b", "delete_file", "delete_a/b", "restart", "x/y", "Search"]
    uris = ["file:///srv/docs/readme", "file:///srv/docs/", "file:///srv/docs", "file:///srv/docs/a/b",
            "file:///srv/docs/secret", "file:///srv/docs/secret/", "file:///srv/docs/secret/k",
            "file:///srv/docs/secret/a/b", "file:///etc/passwd", "file:///srv/docs/a?x=1", "file:///srv/docs/a?x=/",
            "file:///srv/docs/../x", "file:///../x", "https://example.com/srv/docs/x", "file:///srv/docs/%2e%2e/y"]
    operations: list[tuple[Operation, int]] = []
    for tool, hinted in itertools.product(tools, range(4)):
        operations += [(Operation("tool_call", "tools/call", 1, name=tool, arguments={}), hinted),
                       (Operation("tool_call", "tools/list", name=tool), hinted)]
    for uri in uris:
        operations += [(operation_for(method, uri=uri), 0) for method in ("resources/read", "resources/subscribe")]
        operations.append((Operation("resource_read", "resources/list", uri=uri), 0))
    for template in ("file:///srv/docs/{name}", "file:///srv/docs/secret/{name}", "file:///srv/{a}/{b}"):
        operations += [(operation_for("completion/complete", uri=template), 0),
                       (Operation("completion", "resources/templates/list", uri=template), 0)]
    for prompt in ("summarize", "other"):
        operations += [(operation_for("prompts/get", prompt), 0), (operation_for("completion/complete", prompt), 0)]
    operations += [(operation_for(method), 0) for method in (
        "tools/list", "prompts/list", "resources/list", "resources/templates/list", "logging/setLevel",
        "subscriptions/listen", "sampling/createMessage", "elicitation/create", "roots/list", "initialize", "ping",
        "tasks/list", "no/such/method")]
    operations.append((Operation("tool_call", "tools/call", 1, name="search", input_responses=("elicitation",)), 0))
    return [({"sub": "someone", **claims}, granted, operation, hinted)
            for claims, granted, (operation, hinted) in itertools.product(callers, roles, operations)]


def test_default_cedar_and_default_yaml_agree_on_every_caller_and_operation_of_a_grid() -> None:
    grid = _grid()
    differ = []
    for claims, roles, operation, hinted in grid:
        principal = replace(principal_from(claims), roles=roles)
        ours, theirs = decide(principal, operation, CEDAR, hinted), decide(principal, operation, YAML, hinted)
        if ours.outcome != theirs.outcome or ours.required_level != theirs.required_level:
            differ.append((claims, sorted(roles), operation.method, operation.target, hinted, ours.outcome,
                           ours.reason, theirs.outcome, theirs.reason))
    assert differ == []
    assert len(grid) > 5000


@pytest.mark.parametrize("policy", ["default.yaml", "default.cedar"])
def test_policy_test_runs_the_same_cases_against_either_policy(policy: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cases = ROOT / "policies" / "default.tests.yaml"
    assert cli.main(["policy", "test", str(cases), "--policy", str(ROOT / "policies" / policy)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and f"policies/{policy} version" in out
    assert len(yaml.safe_load(cases.read_text())["cases"]) >= 30


def test_policy_test_fails_a_case_the_other_policy_decides_otherwise(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    stricter = tmp_path / "strict.cedar"
    stricter.write_text((ROOT / "policies" / "default.cedar").read_text()
                        + '\n@id("no-search")\nforbid (principal, action, resource is Gateway::Tool)\n'
                          'when { resource.name == "search" };\n')
    assert cli.main(["policy", "test", str(ROOT / "policies" / "default.tests.yaml"), "--policy", str(stricter)]) == 1
    assert "FAIL  a reader may search  (got denied (no-search))" in capsys.readouterr().out


# ---- load errors ---------------------------------------------------------------------------------------


def _problems(tmp_path: Path, text: str, schema: dict[str, Any] | None = None) -> list[str]:
    path = tmp_path / "p.cedar"
    path.write_text(text)
    if schema is not None:
        (tmp_path / "p.cedarschema.json").write_text(json.dumps(schema))
    with pytest.raises(PolicyError) as refused:
        load_policy(path)
    return [problem.removeprefix(f"{path}: ") for problem in refused.value.problems]


GRANT = 'permit (principal, action == Gateway::Action::"tools/call", resource);\n'


@pytest.mark.parametrize(("text", "expected"), [
    ('// a comment; with a semicolon\n' + GRANT + '\n@id("x; \\"y\\"")\nforbid (principal action, resource);\n',
     ["line 4: unexpected token `action`"]),
    ('permit (principal, action, resource is Gateway::Resource) when { resource.uri like "https://x;//y" };\n'
     "forbid (principal, action resource);\n", ["line 2: unexpected token `resource`"]),
    (GRANT + GRANT + "permit (principal, action, resource) when { resource.nmae == \"x\" }",
     ["line 3: unexpected end of input"]),
    (GRANT + 'permit (principal, action == Gateway::Action::"tools/call", resource)\n'
     'when { resource.nmae == "x" };\n', ["line 2: attribute `nmae` on entity type `Gateway::Tool` not found"]),
    ('permit (principal, action == Gateway::Action::"tools/run", resource);\n',
     ["line 1: unable to find an applicable action given the policy scope constraints",
      'line 1: unrecognized action `Gateway::Action::"tools/run"`']),
    ('permit (principal, action == Gateway::Action::"tools/call", resource) when { context.arguments.path == "x" };',
     ['line 1: attribute `arguments.path` in context for Gateway::Action::"tools/call" not found',
      'line 1: unable to guarantee safety of access to optional attribute `arguments` in context for '
      'Gateway::Action::"tools/call"']),
    ('@step_up("critical")\n' + GRANT + '@step_up("extreme") forbid (principal, action, resource);\n'
     '@mode("shadow") forbid (principal, action, resource);\n',
     ['line 1: @step_up("critical"): on a forbid, with a level: low, standard, high, critical',
      'line 3: @step_up("extreme"): on a forbid, with a level: low, standard, high, critical',
      'line 4: @mode("shadow"): on a forbid, one of enforce, audit_only']),
    ("permit (principal == ?principal, action, resource);\n",
     ["line 1: a template (?principal, ?resource) is not a policy the gateway can apply"]),
    ("// nothing but a comment\n", ["(file): no policies: every request would be refused"]),
])
def test_a_cedar_file_that_does_not_parse_or_validate_is_refused_with_its_lines(tmp_path: Path, text: str,
                                                                                expected: list[str]) -> None:
    problems = _problems(tmp_path, text)
    assert [p.split(" (", 1)[0] if "attribute `nmae`" in p else p for p in problems] == expected


def test_a_schema_beside_the_policy_must_be_the_gateways_own(tmp_path: Path) -> None:
    other = base_schema()
    other["Gateway"]["entityTypes"]["User"]["shape"]["attributes"]["admin"] = {"type": "Boolean"}
    assert _problems(tmp_path, GRANT, other) == [
        f"{tmp_path / 'p.cedarschema.json'}: (file): not the gateway's schema with argument types added (print it "
        "again with `mcp-gateway policy cedar-schema`)"]


def test_the_schema_of_the_actions_follows_the_gateways_method_table() -> None:
    from gateway.mcp import METHODS, SERVER_REQUEST_METHODS

    decided = {m for m, spec in METHODS.items() if spec.kind not in PROTOCOL_KINDS}
    assert set(ACTIONS) == decided | {"sampling/createMessage", "elicitation/create", "roots/list"}
    assert set(SERVER_REQUEST_METHODS) - set(ACTIONS) == {"ping"}
    cedarpy.Schema.from_json_str(json.dumps(base_schema()))


# ---- annotations, arguments ------------------------------------------------------------------------------

ANNOTATED = '''
@id("grant") permit (principal, action == Gateway::Action::"tools/call", resource is Gateway::Tool)
when { resource.name != "unlisted" };
@id("trial") @mode("audit_only")
forbid (principal, action == Gateway::Action::"tools/call", resource is Gateway::Tool) when { resource.name == "rm" };
@id("hard") forbid (principal, action == Gateway::Action::"tools/call", resource is Gateway::Tool)
when { resource.name == "halt" };
@id("mfa-to-deploy") @step_up("high")
forbid (principal, action == Gateway::Action::"tools/call", resource is Gateway::Tool)
when { resource.name like "deploy*" || resource.name == "unlisted" } unless { principal.amr.contains("mfa") };
@id("hwk-for-prod, on trial") @step_up("critical") @mode("audit_only")
forbid (principal, action == Gateway::Action::"tools/call", resource is Gateway::Tool)
when { resource.name == "deploy_prod" } unless { principal.amr.contains("hwk") };
@id("unlisted-by-hwk")
permit (principal, action == Gateway::Action::"tools/call", resource == Gateway::Tool::"unlisted")
when { principal.amr.contains("hwk") };
@id("vault-needs-mfa") @step_up("high")
forbid (principal, action == Gateway::Action::"tools/call", resource == Gateway::Tool::"vault")
unless { principal.amr.contains("mfa") };
'''


@pytest.mark.parametrize(("amr", "tool", "outcome", "reason", "would_deny"), [
    ((), "ls", "allowed", "grant", ""),
    ((), "rm", "allowed", "grant", "trial"),  # a rule on trial: recorded, not enforced
    ((), "halt", "denied", "hard", ""),
    ((), "deploy_x", "step_up", "mfa-to-deploy", ""),
    (("mfa",), "deploy_x", "allowed", "grant", ""),
    (("mfa",), "deploy_prod", "allowed", "grant", "hwk-for-prod, on trial"),
    ((), "deploy_prod", "step_up", "mfa-to-deploy", ""),  # the enforced step-up wins over the one on trial
    ((), "unlisted", "denied", "no-grant:tool", ""),  # a step-up only where a permit would allow the call
    ((), "vault", "step_up", "vault-needs-mfa", ""),  # a policy naming its resource is set apart: the same
    (("mfa",), "vault", "allowed", "grant", ""),
    (("hwk",), "unlisted", "step_up", "mfa-to-deploy", ""),
    (("hwk", "mfa"), "unlisted", "allowed", "unlisted-by-hwk", ""),
])
def test_step_up_and_audit_only_forbids(tmp_path: Path, amr: tuple[str, ...], tool: str, outcome: str, reason: str,
                                        would_deny: str) -> None:
    (tmp_path / "p.cedar").write_text(ANNOTATED)
    policy = load_policy(tmp_path / "p.cedar")
    decision = decide(Principal("u", "i", amr=frozenset(amr)), Operation("tool_call", "tools/call", 1, name=tool),
                      policy)
    assert (decision.outcome, decision.reason, decision.would_deny) == (outcome, reason, would_deny)
    assert decision.required_level == ("high" if outcome == "step_up" else None)


def _many_patterns() -> str:
    call, read = 'action == Gateway::Action::"tools/call"', 'action == Gateway::Action::"resources/read"'
    lines = ['@id("anywhere") permit (principal, action, resource is Gateway::Tool)\n'
             'when { resource.name like "*any" };',
             f'@id("bad") forbid (principal, {call}, resource) when {{ resource.name like "*bad" }};']
    for i in range(40):
        lines += [f'@id("p{i}") permit (principal, {call}, resource) when {{ resource.name like "p{i}_*" }};',
                  f'@id("exact{i}") permit (principal, {call}, resource) when {{ "exact{i}" == resource.name }};',
                  f'@id("dir{i}") permit (principal, {read}, resource) when {{ resource.directory == "file:///d/{i}/" '
                  f'&& principal.scopes.contains("read") }};',
                  f'@id("tree{i}") permit (principal, {read}, resource)\n'
                  f'when {{ resource.uri like "file:///t/{i}/*" }};']
    return "\n".join(lines) + "\n"


def test_permits_grouped_by_the_prefix_they_demand_decide_as_the_whole_file_does(tmp_path: Path) -> None:
    text = _many_patterns()
    (tmp_path / "p.cedar").write_text(text)
    policy = load_policy(tmp_path / "p.cedar")
    source = read_cedar(tmp_path / "p.cedar")
    index = PolicyIndex(source.policies, source.rules)
    # the two policies without a prefix, and the one permit whose prefix the name has: not all 160
    assert sorted(len(s) for s in index.sets("tools/call", "Tool", "p1_x")) == [1, 2]
    whole = cedarpy.PolicySet.from_str(text)
    names = ["p1_x", "p12_x", "p1_", "p1", "p1_bad", "exact7", "exact77", "exact", "x_any", "p39_any", "q", ""]
    uris = ["file:///d/3/a", "file:///d/3/a/b", "file:///d/30/a", "file:///d/3/", "file:///t/3/a/b", "file:///t/3",
            "file:///t/39/x", "file:///d/", "https://d/3/a"]
    checked = 0
    for scopes, (kind, key) in itertools.product(
            (frozenset(), frozenset({"read"})), [("Tool", n) for n in names] + [("Resource", u) for u in uris]):
        principal = Principal("u", "i", scopes=scopes)
        operation = (Operation("tool_call", "tools/call", 1, name=key, arguments={}) if kind == "Tool"
                     else Operation("resource_read", "resources/read", 1, uri=key))
        decision = decide(principal, operation, policy)
        attrs = {"name": key} if kind == "Tool" else {"uri": key, "directory": key[:key.rfind("/") + 1]}
        entities = [user_entity(principal), {"uid": {"type": f"Gateway::{kind}", "id": key}, "attrs": attrs,
                                             "parents": []}]
        request = {"principal": {"type": "Gateway::User", "id": "u"},
                   "action": {"type": "Gateway::Action", "id": operation.method},
                   "resource": {"type": f"Gateway::{kind}", "id": key},
                   "context": {"hinted_level": 0, **({"arguments": {}} if kind == "Tool" else {})}}
        answer = cedarpy.is_authorized(request, whole, json.dumps(entities))
        assert decision.allowed == answer.allowed, (kind, key, scopes)
        if answer.allowed:
            first = min(answer.diagnostics.reasons, key=lambda pid: int(pid.removeprefix("policy")))
            assert decision.reason == answer.diagnostics.id_annotations_by_reason[first]
        checked += answer.allowed
    assert checked >= 10


ARGUMENT_RULES = '''
@id("grant") permit (principal, action, resource);
@id("not-etc") forbid (principal, action == Gateway::Action::"tools/call", resource)
when { context has arguments && context.arguments has path && context.arguments.path like "/etc/*" };
'''
TOOLS = [{"name": "read_file", "inputSchema": {"type": "object", "properties": {
    "path": {"type": "string"}, "lines": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "options": {"type": "object", "properties": {"follow": {"type": "boolean"}, "ratio": {"type": "number"}}}}}},
    {"name": "count", "inputSchema": {"type": "object", "properties": {"lines": {"type": "string"}}}}]


def test_arguments_are_typed_by_the_generated_schema_and_read_safely(tmp_path: Path) -> None:
    # the base schema declares no argument: one read behind `has` validates, untyped; the tools' schema types it
    mistaken = ARGUMENT_RULES.replace('like "/etc/*"', "> 3")
    (tmp_path / "p.cedar").write_text(mistaken)
    load_policy(tmp_path / "p.cedar")
    schema = tool_schema(TOOLS)
    assert _problems(tmp_path, mistaken, schema) == [
        "line 3: unexpected type: expected Long but saw String"]
    assert schema["Gateway"]["commonTypes"]["Arguments"]["attributes"] == {  # `lines` is typed twice: left out
        "path": {"type": "String", "required": False},
        "tags": {"type": "Set", "element": {"type": "String"}, "required": False},
        "options": {"type": "Record", "attributes": {"follow": {"type": "Boolean", "required": False}},
                    "required": False}}
    (tmp_path / "p.cedar").write_text(ARGUMENT_RULES)
    policy = load_policy(tmp_path / "p.cedar")
    without_schema = tmp_path / "q.cedar"
    without_schema.write_text('@id("grant") permit (principal, action, resource);\n')
    assert policy.version != load_cedar_policy(without_schema).version
    principal = Principal("u", "i")

    def call(arguments: dict[str, Any] | None, method: str = "tools/call") -> Decision:
        return decide(principal, Operation("tool_call", method, 1, name="read_file", arguments=arguments), policy)

    assert call({"path": "/srv/x"}).allowed
    refused = call({"path": "/etc/passwd"})
    assert (refused.allowed, refused.reason, refused.hidden) == (False, "not-etc", False)  # the tool exists
    assert call(None, "tools/list").allowed  # listed: a call with other arguments may pass
    assert call({"path": 1.5, "options": None}).allowed  # what Cedar has no form for is left out
    # Cedar's JSON reads {"__entity": ...} as an entity: such members are dropped, so the path is a record here,
    # `like` fails on it, and a forbid that cannot be evaluated refuses
    assert call({"path": {"__entity": {"type": "Gateway::User", "id": "admin"}}}).reason == "cedar-error:not-etc"
    cache = DecisionCache()  # the decision reads the arguments: not remembered per tool
    assert policy.constrained_tools.matches("read_file")
    assert cache(principal, Operation("tool_call", "tools/call", 1, name="read_file", arguments={"path": "/a"}),
                 policy).allowed
    assert not cache(principal, Operation("tool_call", "tools/call", 1, name="read_file",
                                          arguments={"path": "/etc/x"}), policy).allowed


def test_claims_are_tags_of_strings() -> None:
    principal = principal_from({"sub": "c", "groups": ["ops", 3, None, {"a": 1}], "admin": True, "n": 2.5,
                                "nested": {"x": 1}, "gateway_level": "high", "amr": ["mfa"], "client_id": "app"})
    entity = user_entity(principal)
    assert entity["tags"]["groups"] == ["ops", "3"] and entity["tags"]["admin"] == ["true"]
    assert entity["tags"]["n"] == ["2.5"] and "nested" not in entity["tags"]
    assert entity["attrs"] | {"scopes": []} == {
        "subject": "c", "issuer": "policy-tool", "client_id": "app", "roles": [], "scopes": [], "amr": ["mfa"],
        "acr": "", "max_level": 2}


# ---- config, reload, explain ------------------------------------------------------------------------------


def _config(tmp_path: Path, policy: Any, **extra: Any) -> Path:
    path = write_config(tmp_path, "http://127.0.0.1:9/mcp")
    data = yaml.safe_load(path.read_text())
    data.update(policy=policy, **extra)
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_config_names_a_cedar_policy_and_its_settings(tmp_path: Path) -> None:
    shutil.copy(ROOT / "policies" / "default.cedar", tmp_path / "mcp.cedar")
    config = load_config(_config(tmp_path, {"engine": "cedar", "file": "mcp.cedar", "mode": "audit_only",
                                            "deny_detail": "explain"}, auth={"anonymous_role": "visitor"}))
    policy = config.policy
    assert (policy.source, policy.mode, policy.deny_detail, policy.unknown_methods) == (
        str(tmp_path / "mcp.cedar"), "audit_only", "explain", "deny")
    denied = decide(principal_from(READER), operation_for("tools/call", "delete_file"), policy)
    assert (denied.allowed, denied.would_deny) == (True, "no-grant:tool")  # the whole policy on trial
    assert load_config(_config(tmp_path, "mcp.cedar")).policy.engine is not None  # by its suffix
    (tmp_path / "mcp.cedar").write_text((tmp_path / "mcp.cedar").read_text() + "\n// changed\n")
    again = reread_policy(policy)  # a reload keeps what the config said
    assert (again.mode, again.deny_detail, again.version != policy.version) == ("audit_only", "explain", True)


@pytest.mark.parametrize(("policy", "problem"), [
    ({"file": "policy.yaml", "mode": "audit_only"}, "policy: mode: set in the YAML policy file itself, not here"),
    ({"engine": "yaml", "file": "x.cedar"}, "policy.engine: yaml, but x.cedar is a Cedar policy"),
    ({"engine": "rego", "file": "x.rego"}, "policy.engine: Input should be 'yaml' or 'cedar'"),
    ({"file": "missing.cedar"}, "missing.cedar: (file): cannot read: No such file or directory"),
    (["policy.yaml"], "policy: a path to a policy file, or {engine, file, ...}"),
])
def test_a_bad_policy_key_is_named(tmp_path: Path, policy: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(_config(tmp_path, policy))
    assert [p for p in refused.value.problems if p.endswith(problem)], refused.value.problems


def test_explain_words_a_cedar_decision() -> None:
    lines = explain(CEDAR, principal_from(OPS), operation_for("tools/call", "delete_file")).lines()
    assert "rule:       level:authentication<critical" in lines
    assert "  - authentication reaching level critical" in lines
    assert any(line.startswith("auth level: as the Cedar policy reads amr (pwd)") for line in lines)
    refused = explain(CEDAR, principal_from(READER), operation_for("tools/call", "delete_file")).lines()
    assert f"  - a permit in {CEDAR.source} that holds for this principal" in refused


# ---- the schema from an upstream's tools, and a gateway in front of one ----------------------------------

ARGUMENT_FORBID = '''
@id("no-secrets-echoed")
forbid (principal, action == Gateway::Action::"tools/call", resource is Gateway::Tool)
when { resource.name == "echo" && context has arguments && context.arguments has text &&
       context.arguments.text like "*secret*" };
'''


def test_a_gateway_with_a_cedar_policy_filters_allows_refuses_and_audits(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    recorder = Recorder(build_server().streamable_http_app())
    upstream = ServerThread(recorder).start()
    port = free_port()
    try:
        shutil.copy(ROOT / "policies" / "default.cedar", tmp_path / "mcp.cedar")
        config_path = _config(tmp_path, {"engine": "cedar", "file": "mcp.cedar", "deny_detail": "explain"},
                              public_url=f"http://127.0.0.1:{port}", policy_reload_interval_s=0)
        data = yaml.safe_load(config_path.read_text())
        data["upstreams"][0]["url"] = f"{upstream.url}/mcp"
        config_path.write_text(yaml.safe_dump(data))
        # the schema the upstream's tools give, kept beside the policy: a forbid reading echo's `text` validates
        assert cli.main(["policy", "cedar-schema", "--config", str(config_path)]) == 0
        printed = capsys.readouterr().out
        cedarpy.Schema.from_json_str(printed)
        assert json.loads(printed)["Gateway"]["commonTypes"]["Arguments"]["attributes"]["text"]["type"] == "String"
        # the base schema lets a guarded argument read through untyped; lint holds it to the upstream's tools
        default = (tmp_path / "mcp.cedar").read_text()
        (tmp_path / "mcp.cedar").write_text(default + ARGUMENT_FORBID.replace('like "*secret*"', "> 3"))
        assert cli.main(["policy", "lint", "--config", str(config_path)]) == 1
        line = len(default.splitlines()) + 2
        assert f"mcp.cedar: line {line}: unexpected type: expected Long but saw String" in capsys.readouterr().out
        (tmp_path / "mcp.cedar").write_text(default + ARGUMENT_FORBID)
        (tmp_path / "mcp.cedarschema.json").write_text(printed)
        assert cli.main(["policy", "lint", "--config", str(config_path)]) == 0
        gateway_app: Any = create_app(config_path)
        gateway = Deployment("proxy", ServerThread(gateway_app, port).start(), recorder, gateway_app.runtime,
                             config_path, upstream)
    except BaseException:
        upstream.stop()
        raise
    try:
        assert gateway.runtime.policy.engine is not None
        _use_as_a_reader(gateway)
        assert [c["params"]["arguments"] for c in recorder.tool_calls("echo")] == [{"text": "hello"}]
        assert recorder.tool_calls("delete_file") == []
        refused = [(e["tool_executed"], e["reason"], e["policy_version"]) for e in gateway.audit_events()
                   if e["operation"] == "tools/call" and e["result"] == "denied"]
        assert refused == [("echo", "no-secrets-echoed", gateway.runtime.policy.version),
                           ("delete_file", "no-grant:tool", gateway.runtime.policy.version)]
        # a hot reload reads the file again as Cedar, with the settings the config gave it
        (tmp_path / "mcp.cedar").write_text((tmp_path / "mcp.cedar").read_text().replace("no-secrets", "no-secret"))
        assert gateway.runtime.reload_policy()
        fresh = gateway.runtime.policy
        assert (fresh.engine is not None, fresh.deny_detail) == (True, "explain")
        assert decide(principal_from(READER), replace(operation_for("tools/call", "echo"), arguments={
            "text": "a secret"}), fresh).reason == "no-secret-echoed"
    finally:
        gateway.stop()


def _use_as_a_reader(gateway: Deployment) -> None:
    async def use() -> None:
        async with _client(gateway, "auto", gateway.token("rae", scopes=("mcp:tools",))) as reader:
            listed = {t.name for t in (await reader.list_tools()).tools}
            assert listed == {"search", "get_weather", "get_forecast", "echo"}
            found = await reader.call_tool("search", {"query": "gateway"})
            assert "hit(s)" in found.content[0].text  # type: ignore[union-attr]
            echoed = await reader.call_tool("echo", {"text": "hello"})
            assert echoed.content[0].text == "hello"  # type: ignore[union-attr]
            with pytest.raises(MCPError) as refused:
                await reader.call_tool("echo", {"text": "the secret is 42"})
            assert "refused by no-secrets-echoed" in refused.value.error.message
            with pytest.raises(MCPError) as hidden:
                await reader.call_tool("delete_file", {"path": "/srv/x"})
            assert "no-grant:tool" in hidden.value.error.message

    asyncio.run(use())


# ---- where the request came from: the protocol era and the upstream -------------------------------------------

WHERE = """
@id("grant") permit (principal, action, resource);
@id("modern-only") forbid (principal, action == Gateway::Action::"tools/call", resource == Gateway::Tool::"echo")
  when { context.era != "modern" };
@id("not-on-files") forbid (principal, action == Gateway::Action::"tools/call", resource == Gateway::Tool::"search")
  when { context.upstream == "files" };
"""


@pytest.mark.parametrize(("tool", "era", "upstream", "reason"), [
    ("echo", "modern", "files", "grant"),
    ("echo", "legacy", "files", "modern-only"),
    ("echo", "", "files", "modern-only"),  # an era not known is not modern
    ("search", "legacy", "other", "grant"),
    ("search", "modern", "files", "not-on-files"),
])
def test_a_cedar_policy_reads_the_era_and_the_upstream_from_its_context(tmp_path: Path, tool: str, era: str,
                                                                        upstream: str, reason: str) -> None:
    (tmp_path / "p.cedar").write_text(WHERE)
    policy = load_policy(tmp_path / "p.cedar")
    decision = DecisionCache()(principal_from(READER), operation_for("tools/call", tool), policy,
                               era=era, upstream=upstream)
    assert decision.reason == reason
    explained = explain(policy, principal_from(READER), operation_for("tools/call", tool), era=era,
                        upstream=upstream)
    assert explained.decision.reason == reason


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_the_gateway_gives_a_cedar_policy_the_era_and_the_upstream_of_each_request(tmp_path: Path,
                                                                                         era: str) -> None:
    recorder = Recorder(build_server().streamable_http_app())
    upstream = ServerThread(recorder).start()
    port = free_port()
    (tmp_path / "mcp.cedar").write_text(WHERE.replace('"files"', '"demo"'))
    config_path = _config(tmp_path, {"engine": "cedar", "file": "mcp.cedar"}, public_url=f"http://127.0.0.1:{port}")
    data = yaml.safe_load(config_path.read_text())
    data["upstreams"][0]["url"] = f"{upstream.url}/mcp"
    config_path.write_text(yaml.safe_dump(data))
    gateway_app: Any = create_app(config_path)
    gateway = Deployment("proxy", ServerThread(gateway_app, port).start(), recorder, gateway_app.runtime,
                         config_path, upstream)
    try:
        assert [u.name for u in gateway.runtime.config.upstreams] == ["demo"]
        async with _client(gateway, era, gateway.token("rae", scopes=("mcp:tools",))) as client:
            if era == "auto":  # the SDK speaks 2026-07-28 when it can: modern
                assert (await client.call_tool("echo", {"text": "hi"})).content[0].text == "hi"  # type: ignore[union-attr]
            else:
                with pytest.raises(MCPError):
                    await client.call_tool("echo", {"text": "hi"})
            with pytest.raises(MCPError):
                await client.call_tool("search", {"query": "x"})
        assert len(recorder.tool_calls("echo")) == (1 if era == "auto" else 0)
        assert recorder.tool_calls("search") == []
        refused = [e["rule"] for e in gateway.audit_events()
                   if e["operation"] == "tools/call" and e["result"] == "denied"]
        assert refused == (["not-on-files"] if era == "auto" else ["modern-only", "not-on-files"])
    finally:
        gateway.stop()


# ---- forbids that cannot be evaluated, answers to the server, and what mode audit_only leaves refused ----------

ERRORING = '''
@id("grant") permit (principal, action, resource);
@id("limit, on trial") @mode("audit_only")
forbid (principal, action == Gateway::Action::"tools/call", resource)
when { context has arguments && context.arguments has limit && context.arguments.limit > 100 };
@id("size-cap")
forbid (principal, action == Gateway::Action::"tools/call", resource)
when { context has arguments && context.arguments has size && context.arguments.size > 100 };
'''


@pytest.mark.parametrize(("arguments", "outcome", "reason", "would_deny"), [
    ({"limit": 5}, "allowed", "grant", ""),
    ({"limit": 500}, "allowed", "grant", "limit, on trial"),
    # a forbid on trial that cannot be evaluated refuses nothing: what it would have done is recorded
    ({"limit": "ten"}, "allowed", "grant", "limit, on trial"),
    ({"size": 500}, "denied", "size-cap", ""),
    ({"size": "ten"}, "denied", "cedar-error:size-cap", ""),  # an enforced one fails closed
])
def test_a_forbid_in_audit_only_that_cannot_be_evaluated_is_recorded_and_an_enforced_one_refuses(
        tmp_path: Path, arguments: dict[str, Any], outcome: str, reason: str, would_deny: str) -> None:
    (tmp_path / "p.cedar").write_text(ERRORING)
    policy = load_policy(tmp_path / "p.cedar")
    decision = decide(Principal("u", "i"), Operation("tool_call", "tools/call", 1, name="query", arguments=arguments),
                      policy)
    assert (decision.outcome, decision.reason, decision.would_deny) == (outcome, reason, would_deny)


SAMPLING_RULES = '''
@id("grant") permit (principal, action, resource);
@id("sampling, on trial") @mode("audit_only")
forbid (principal, action == Gateway::Action::"sampling/createMessage", resource) when { principal.subject == "trial" };
@id("no-sampling") forbid (principal, action == Gateway::Action::"sampling/createMessage", resource)
when { principal.subject == "barred" };
'''


@pytest.mark.parametrize(("subject", "asked", "answered"), [
    ("trial", (True, "grant", "sampling, on trial"), (True, "grant")),
    ("barred", (False, "no-sampling", ""), (False, "input_response:sampling")),
    ("free", (True, "grant", ""), (True, "grant")),
])
def test_an_answer_to_the_server_is_decided_as_the_request_it_answers(
        tmp_path: Path, subject: str, asked: tuple[bool, str, str], answered: tuple[bool, str]) -> None:
    (tmp_path / "p.cedar").write_text(SAMPLING_RULES)
    policy = load_policy(tmp_path / "p.cedar")
    principal = Principal(subject, "i")
    request = decide(principal, operation_for("sampling/createMessage"), policy)
    assert (request.allowed, request.reason, request.would_deny) == asked
    retry = decide(principal, Operation("tool_call", "tools/call", 1, name="search", input_responses=("sampling",)),
                   policy)
    assert (retry.allowed, retry.reason) == answered


@pytest.mark.parametrize(("operation", "reason"), [
    # a string Cedar cannot read (a lone surrogate): no rule refuses it, the request cannot be asked at all
    (Operation("tool_call", "tools/call", 1, name="echo", arguments={"text": "\ud800"}), "cedar-error:request"),
    (operation_for("admin/exec"), "unknown_methods:deny"),
    (Operation("tool_call", "tools/call", 1, name="echo", input_responses=("unknown",)), "input_response:unknown"),
    (operation_for("resources/read", uri="file:///../etc/passwd"), "uri:'..' climbs above the root"),
])
def test_under_a_cedar_policy_in_audit_only_what_cedar_cannot_decide_is_firm_and_refused(
        tmp_path: Path, operation: Operation, reason: str) -> None:
    (tmp_path / "p.cedar").write_text(GRANT_ALL)
    policy = load_cedar_policy(tmp_path / "p.cedar", mode="audit_only")
    decision = decide(Principal("u", "i"), operation, policy)
    assert (decision.allowed, decision.reason, decision.would_deny) == (False, reason, "")
    assert decision.firm
    shadowed = decide(Principal("u", "i"), operation_for("tools/call", "delete_file"), policy)
    assert (shadowed.allowed, shadowed.would_deny) == (True, "not-delete")  # a rule's refusal: let through


GRANT_ALL = '''
@id("grant") permit (principal, action, resource);
@id("not-delete") forbid (principal, action == Gateway::Action::"tools/call", resource == Gateway::Tool::"delete_file");
'''


def test_a_subject_cedar_cannot_hold_is_refused_firmly_not_an_error() -> None:
    # a JWT's sub may carry a lone surrogate (the stdlib json that reads tokens accepts one); Cedar cannot
    policy = load_policy(ROOT / "policies" / "default.cedar")
    decision = decide(Principal("u\ud800", "issuer"), Operation("tool_call", "tools/call", 1, name="search",
                                                                 arguments={}), policy)
    assert (decision.allowed, decision.reason, decision.firm) == (False, "cedar-error:request", True)
