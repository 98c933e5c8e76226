"""Shadow mode: `mode: audit_only` for a whole policy or for one rule lets a refused call through, recorded.

A refusal under audit_only comes back allowed, with the refusal in `would_deny`. Policy-wide, the decision's
reason becomes `mode:audit_only`; a rule in shadow is decided around (the enforced rules decide; the shadow ones
only say what they would have refused). A URI the gateway cannot read safely is refused in either mode. As a
decision table; then end to end with the SDK client (the shadowed call reaches the upstream, the enforced one
never does), the audit trail (every event names the policy version and the rule that decided), a hot reload from
shadow to enforce, and the policy tools (`policy test` with `expect: would_deny`, `policy explain`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mcp.shared.exceptions import MCPError
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli_tools import tool_rows
from gateway.mcp import Operation
from gateway.policy import Policy, PolicyError, decide, load_policy
from gateway.policy.explain import explain, operation_for, principal_from, run_cases
from gateway.policy.model import LEVEL
from tests.harness import DEFAULT_POLICY, ROOT, Deployment, deploy
from tests.test_approvals import _client
from tests.test_bad_input import BASE_HEADERS, modern

WHOLE = """
mode: audit_only
roles:
  reader:
    permissions:
      can_read_resources: ["file:///srv/docs/**"]
      can_execute_tools: [search]
  operator:
    security_level: critical
    permissions: {can_execute_tools: ["*"]}
bindings:
  - {when: {scope: "mcp:tools"}, roles: [reader]}
  - {when: {claim: {groups: ops}}, roles: [operator]}
tools:
  delete_*: {security_level: critical}
"""

RULES = """
roles:
  reader:
    permissions: {can_execute_tools: [search]}
  operator:
    security_level: critical
    capabilities: [filesystem:read]
    permissions:
      can_execute_tools: ["*"]
      can_read_resources: ["file:///srv/**"]
      can_access_prompts: ["*"]
bindings:
  - {when: {scope: "mcp:tools"}, roles: [reader]}
  - {when: {claim: {groups: ops}}, roles: [operator]}
authentication_levels:
  rules: [{when: {amr: hwk}, level: critical}]
tools:
  delete_*: {security_level: critical, mode: audit_only}
  read_file: {mode: audit_only, arguments: {path: {kind: path, within: ["/srv/docs/**"]}}}
  write_file: {capabilities: ["filesystem:write"], mode: audit_only}
  purge_*: {security_level: critical}
  purge_all: {capabilities: ["process:create"], mode: audit_only}
  run_query: {arguments: {sql: {max_length: 20}}}
  run_*: {security_level: critical, mode: audit_only}
resources:
  "file:///srv/secret/**": {capabilities: ["filesystem:write"], mode: audit_only}
prompts:
  jailbreak: {capabilities: ["process:create"], mode: audit_only}
"""

READER = {"scope": "mcp:tools"}
OPS = {"groups": ["ops"]}
OPS_HWK = {"groups": ["ops"], "amr": ["hwk"]}


def _write(directory: Path, text: str, name: str = "policy.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Policy]:
    directory = tmp_path_factory.mktemp("shadow")
    return {"whole": load_policy(_write(directory, WHOLE, "whole.yaml")),
            "rules": load_policy(_write(directory, RULES, "rules.yaml"))}


def _call(name: str, **arguments: Any) -> Operation:
    return Operation("tool_call", "tools/call", 1, name, None, arguments)


TABLE: list[tuple[str, str, dict[str, Any], Operation, str, str, str]] = [
    # (case, policy, claims, operation, outcome, reason, would_deny)
    ("whole: an ungranted tool passes, recorded", "whole", READER, operation_for("tools/call", "delete_file"),
     "allowed", "mode:audit_only", "no-grant:tool"),
    ("whole: a step-up passes, recorded", "whole", OPS, operation_for("tools/call", "delete_file"),
     "allowed", "mode:audit_only", "level:authentication<critical"),
    ("whole: no role at all passes, recorded", "whole", {}, operation_for("tools/call", "search"),
     "allowed", "mode:audit_only", "no-role"),
    ("whole: a granted call has nothing to record", "whole", READER, operation_for("tools/call", "search"),
     "allowed", "role:reader:tool", ""),
    ("whole: traversal above the root is refused", "whole", READER,
     operation_for("resources/read", uri="file:///srv/docs/../../../../etc/passwd"),
     "denied", "uri:'..' climbs above the root", ""),
    ("whole: an encoded slash is refused", "whole", READER,
     operation_for("resources/read", uri="file:///srv/docs/..%2f..%2fetc/passwd"),
     "denied", "uri:encoded slash in URI path", ""),
    ("rule: a tool's level in shadow", "rules", OPS, operation_for("tools/call", "delete_file"),
     "allowed", "role:operator:tool", "level:authentication<critical"),
    ("rule: a tool's argument constraint in shadow", "rules", OPS, _call("read_file", path="/etc/passwd"),
     "allowed", "role:operator:tool", "argument:path:within"),
    ("rule: arguments the shadow constraint accepts", "rules", OPS, _call("read_file", path="/srv/docs/a.txt"),
     "allowed", "role:operator:tool", ""),
    ("rule: a tool's capability in shadow", "rules", OPS, operation_for("tools/call", "write_file"),
     "allowed", "role:operator:tool", "capability:filesystem:write"),
    ("rule: a resource rule in shadow", "rules", OPS, operation_for("resources/read", uri="file:///srv/secret/key"),
     "allowed", "role:operator:resource", "capability:filesystem:write"),
    ("rule: a prompt rule in shadow", "rules", OPS, operation_for("prompts/get", "jailbreak"),
     "allowed", "role:operator:prompt", "capability:process:create"),
    ("rule: a shadow rule grants nothing", "rules", READER, operation_for("tools/call", "delete_file"),
     "denied", "no-grant:tool", ""),
    ("rule: the enforced level next to a shadow capability refuses", "rules", OPS,
     operation_for("tools/call", "purge_all"), "step_up", "level:authentication<critical", ""),
    ("rule: once the enforced level holds, the shadow capability is recorded", "rules", OPS_HWK,
     operation_for("tools/call", "purge_all"), "allowed", "role:operator:tool", "capability:process:create"),
    ("rule: an enforced constraint next to a shadow level refuses", "rules", OPS,
     _call("run_query", sql="select * from a_rather_long_table"), "denied", "argument:sql:max_length", ""),
    ("rule: the enforced constraint holds, the shadow level is recorded", "rules", OPS,
     _call("run_query", sql="select 1"), "allowed", "role:operator:tool", "level:authentication<critical"),
]


@pytest.mark.parametrize(("case", "policy", "claims", "operation", "outcome", "reason", "would_deny"), TABLE,
                         ids=[row[0] for row in TABLE])
def test_a_refusal_in_shadow_is_allowed_and_names_what_would_have_refused_it(
        policies: dict[str, Policy], case: str, policy: str, claims: dict[str, Any], operation: Operation,
        outcome: str, reason: str, would_deny: str) -> None:
    decision = decide(principal_from(claims), operation, policies[policy])
    assert (decision.outcome, decision.reason, decision.would_deny) == (outcome, reason, would_deny)
    assert decision.allowed == (outcome == "allowed")
    assert decision.visible or not decision.allowed  # a tool allowed in shadow stays listed
    assert decision.policy_version == policies[policy].version


BAD = [
    ("tools:\n  deploy: {mode: audit_only, approval: {approvers: ['role:r'], mode: retry, timeout_s: 60}}\n",
     "tools.deploy: a rule in mode audit_only refuses nothing, so it cannot ask for an approval"),
    ("mode: shadow\n", "mode: Input should be 'enforce' or 'audit_only'"),
    ("prompts: {p: {mode: shadow}}\n", "prompts.p.mode: Input should be 'enforce' or 'audit_only'"),
]


@pytest.mark.parametrize(("text", "problem"), BAD, ids=[problem.split(":")[0] for _, problem in BAD])
def test_a_bad_mode_is_a_policy_problem_naming_its_key(tmp_path: Path, text: str, problem: str) -> None:
    path = _write(tmp_path, "roles: {r: {}}\n" + text)
    with pytest.raises(PolicyError) as refused:
        load_policy(path)
    assert refused.value.problems == [f"{path}: {problem}"]


SHADOW_POLICY: dict[str, Any] = {**DEFAULT_POLICY, "mode": "audit_only"}
# the counter of shadowed refusals; delete_file is not named by the policy, so its label is "other"
WOULD_DENY = {"result": "would_deny", "reason": "no-grant:tool", "tool": "other"}


def _tool_events(deployment: Deployment, tool: str) -> list[dict[str, Any]]:
    return [e for e in deployment.audit_events() if e["tool_executed"] == tool and e["operation"] == "tools/call"]


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_under_a_policy_in_audit_only_an_ungranted_call_reaches_the_upstream_audited_as_would_deny(
        tmp_path: Path, era: str) -> None:
    gateway = deploy("proxy", tmp_path, policy=SHADOW_POLICY)
    try:
        async with _client(gateway, era, gateway.token("rae")) as reader:
            assert "delete_file" in {t.name for t in (await reader.list_tools()).tools}
            deleted = await reader.call_tool("delete_file", {"path": "/srv/x"})
            assert deleted.content[0].text == "deleted /srv/x"  # type: ignore[union-attr]
        assert [c["params"]["arguments"] for c in gateway.recorder.tool_calls("delete_file")] == [{"path": "/srv/x"}]
        [event] = _tool_events(gateway, "delete_file")
        assert (event["result"], event["reason"], event["rule"], event["would_deny"], event["user_id"]) == (
            "allowed", "mode:audit_only", "mode:audit_only", "no-grant:tool", "rae")
        assert event["policy_version"] == gateway.runtime.policy.version
        families = {f.name: f for f in text_string_to_metric_families(
            httpx.get(f"{gateway.gateway.url}/metrics").text)}
        counted = [(s.labels, s.value) for s in families["mcp_gateway_decisions"].samples
                   if s.name == "mcp_gateway_decisions_total"]
        assert (WOULD_DENY, 1.0) in counted
        assert ({"result": "allowed", "reason": "mode:audit_only", "tool": "other"}, 1.0) in counted
    finally:
        gateway.stop()


async def test_the_same_call_under_mode_enforce_is_refused_and_never_reaches_the_upstream(tmp_path: Path) -> None:
    gateway = deploy("proxy", tmp_path, policy={**DEFAULT_POLICY, "mode": "enforce"})
    try:
        async with _client(gateway, "auto", gateway.token("rae")) as reader:
            assert "delete_file" not in {t.name for t in (await reader.list_tools()).tools}
            with pytest.raises(MCPError) as refused:
                await reader.call_tool("delete_file", {"path": "/srv/x"})
            assert refused.value.error.message == "Unknown tool: delete_file"
        assert gateway.recorder.tool_calls("delete_file") == []
        [event] = _tool_events(gateway, "delete_file")
        assert (event["result"], event["rule"], event["would_deny"]) == ("denied", "no-grant:tool", None)
        assert gateway.runtime.metrics.registry.get_sample_value("mcp_gateway_decisions_total", WOULD_DENY) is None
    finally:
        gateway.stop()


SHADOWED_CONSTRAINT: dict[str, Any] = {
    **DEFAULT_POLICY,
    "tools": {"echo": {"mode": "audit_only", "arguments": {"text": {"max_length": 5}}},
              "get_forecast": {"arguments": {"days": {"range": [1, 7]}}}},
    "deny_detail": "explain",
}


@pytest.mark.parametrize("mode", ["proxy", "middleware"])
async def test_a_constraint_in_shadow_lets_a_bad_argument_through_while_an_enforced_one_refuses(
        tmp_path: Path, mode: str) -> None:
    gateway = deploy(mode, tmp_path, policy=SHADOWED_CONSTRAINT)
    try:
        async with _client(gateway, "auto", gateway.token("rae")) as reader:
            for text in ("hi", "far too long"):
                echoed = await reader.call_tool("echo", {"text": text})
                assert echoed.content[0].text == text  # type: ignore[union-attr]
            with pytest.raises(MCPError) as refused:
                await reader.call_tool("get_forecast", {"region": "north", "days": 30})
            assert refused.value.error.code == -32011 and "argument:days:range" in refused.value.error.message
        assert [c["params"]["arguments"] for c in gateway.recorder.tool_calls("echo")] == [
            {"text": "hi"}, {"text": "far too long"}]
        assert gateway.recorder.tool_calls("get_forecast") == []
        seen = [(e["tool_executed"], e["result"], e["rule"], e["would_deny"]) for e in gateway.audit_events()
                if e["operation"] == "tools/call"]
        assert seen == [("echo", "allowed", "role:reader:tool", None),
                        ("echo", "allowed", "role:reader:tool", "argument:text:max_length"),
                        ("get_forecast", "denied", "argument:days:range", None)]
        sample = gateway.runtime.metrics.registry.get_sample_value
        assert sample("mcp_gateway_decisions_total",
                      {"result": "would_deny", "reason": "argument:text:max_length", "tool": "echo"}) == 1.0
    finally:
        gateway.stop()


def _post(deployment: Deployment, method: str, params: dict[str, Any], token: str | None) -> httpx.Response:
    headers, body = modern(method, params)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(deployment.url, headers={**BASE_HEADERS, **headers}, json=body, timeout=10)


@pytest.mark.parametrize("mode", ["proxy", "middleware"])
def test_every_audit_event_names_the_policy_version_and_the_rule_that_decided(tmp_path: Path, mode: str) -> None:
    gateway = deploy(mode, tmp_path, policy=SHADOW_POLICY)
    try:
        token = gateway.token("rae")
        search = {"name": "search", "arguments": {"query": "demo"}}
        assert _post(gateway, "tools/call", search, None).status_code == 401
        malformed = httpx.post(gateway.url, content=b'{"jsonrpc": "2.0", "id": 1,', timeout=10,
                               headers={**BASE_HEADERS, "Authorization": f"Bearer {token}"})
        assert malformed.status_code == 400
        assert _post(gateway, "tools/call", search, token).status_code == 200
        assert _post(gateway, "tools/call", {"name": "delete_file", "arguments": {"path": "/x"}}, token
                     ).status_code == 200
        traversal = "file:///srv/docs/../../../../etc/passwd"
        assert _post(gateway, "resources/read", {"uri": traversal}, token).status_code == 400
        assert len(gateway.recorder.tool_calls("search")) == len(gateway.recorder.tool_calls("delete_file")) == 1
        assert "resources/read" not in gateway.recorder.mcp_methods()
        events = gateway.audit_events()
        parse = events[1]["rule"] if len(events) > 1 else None  # the parser's words: "parse:unexpected end ..."
        assert parse is not None and parse.startswith("parse:")
        assert [(e["status"], e["result"], e["rule"], e["would_deny"]) for e in events] == [
            (401, "auth_failed", "no_token", None),  # refused before any policy rule: the check is the rule
            (400, "invalid_request", parse, None),
            (200, "allowed", "role:reader:tool", None),
            (200, "allowed", "mode:audit_only", "no-grant:tool"),
            (400, "denied", "uri:'..' climbs above the root", None),
        ]
        assert {e["policy_version"] for e in events} == {gateway.runtime.policy.version}
    finally:
        gateway.stop()


def test_a_shadowed_call_the_upstream_fails_still_names_the_rule_that_let_it_through(tmp_path: Path) -> None:
    gateway = deploy("proxy", tmp_path, policy=SHADOW_POLICY)
    try:
        assert gateway.upstream is not None
        gateway.upstream.stop()
        failed = _post(gateway, "tools/call", {"name": "delete_file", "arguments": {"path": "/x"}}, gateway.token())
        assert failed.status_code == 502
        [event] = _tool_events(gateway, "delete_file")
        assert (event["result"], event["rule"], event["would_deny"]) == (
            "upstream_error", "mode:audit_only", "no-grant:tool")
        assert event["reason"].startswith("upstream:")  # the reason says what became of it, the rule who let it by
    finally:
        gateway.stop()


def test_a_reload_from_audit_only_to_enforce_refuses_the_next_call_under_the_new_version(tmp_path: Path) -> None:
    gateway = deploy("proxy", tmp_path, policy=SHADOW_POLICY)
    try:
        token, delete = gateway.token("rae"), {"name": "delete_file", "arguments": {"path": "/x"}}
        assert _post(gateway, "tools/call", delete, token).status_code == 200
        shadow_version = gateway.runtime.policy.version
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump({**DEFAULT_POLICY, "mode": "enforce"}))
        assert gateway.runtime.reload_policy()
        enforce_version = gateway.runtime.policy.version
        assert enforce_version != shadow_version
        refused = _post(gateway, "tools/call", delete, token)
        assert refused.status_code == 400 and "Unknown tool: delete_file" in refused.text
        assert _post(gateway, "tools/call", delete, None).status_code == 401
        assert len(gateway.recorder.tool_calls("delete_file")) == 1
        seen = [(e["result"], e["rule"], e["would_deny"], e["policy_version"]) for e in gateway.audit_events()]
        assert seen == [("allowed", "mode:audit_only", "no-grant:tool", shadow_version),
                        ("denied", "no-grant:tool", None, enforce_version),
                        ("auth_failed", "no_token", None, enforce_version)]  # decided by no rule: still named
    finally:
        gateway.stop()


CASES = {"cases": [
    {"name": "shadowed", "claims": READER, "method": "tools/call", "tool": "delete_file", "expect": "would_deny",
     "reason": "no-grant:tool"},
    {"name": "granted", "claims": READER, "method": "tools/call", "tool": "search", "expect": "allowed",
     "reason": "role:reader:tool"},
    {"name": "expects the refusal enforced", "claims": READER, "method": "tools/call", "tool": "delete_file",
     "expect": "denied"},
    {"name": "names the wrong rule", "claims": READER, "method": "tools/call", "tool": "delete_file",
     "expect": "would_deny", "reason": "no-role"},
    {"name": "unreadable uri", "claims": READER, "method": "resources/read",
     "uri": "file:///srv/docs/../../../../etc/passwd", "expect": "denied"},
]}


def test_policy_test_expects_would_deny_and_fails_a_case_expecting_the_refusal_enforced(tmp_path: Path) -> None:
    _write(tmp_path, WHOLE, "p.yaml")
    (tmp_path / "p.tests.yaml").write_text(yaml.safe_dump(CASES))
    _, results = run_cases(tmp_path / "p.yaml")
    assert [(r.name, r.passed, r.got) for r in results] == [
        ("shadowed", True, "would_deny (no-grant:tool)"),
        ("granted", True, "allowed (role:reader:tool)"),
        ("expects the refusal enforced", False, "would_deny (no-grant:tool)"),
        ("names the wrong rule", False, "would_deny (no-grant:tool)"),
        ("unreadable uri", True, "denied (uri:'..' climbs above the root)"),
    ]
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "test", str(tmp_path / "p.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PASS  shadowed" in done.stdout
    assert "FAIL  expects the refusal enforced  (got would_deny (no-grant:tool))" in done.stdout
    assert "3 of 5 cases pass" in done.stdout


def test_explain_names_the_refusal_a_shadow_lets_through(policies: dict[str, Policy]) -> None:
    shadowed = explain(policies["whole"], principal_from(READER), operation_for("tools/call", "delete_file"))
    lines = shadowed.lines()
    assert lines[0] == "decision:   allowed"
    assert "rule:       mode:audit_only" in lines
    assert [line for line in lines if line.startswith("would deny:")] == [
        "would deny: no-grant:tool (a rule in mode audit_only: recorded, not enforced)"]
    granted = explain(policies["whole"], principal_from(READER), operation_for("tools/call", "search")).lines()
    assert not any(line.startswith("would deny:") for line in granted)


# ---- what a shadow leaves enforced: a tool's own hints, approvals, the gateway's own refusals ------------------

HINTED = """
roles:
  reader:
    security_level: standard
    permissions: {can_execute_tools: ["*"]}
bindings:
  - {when: {scope: "mcp:read"}, roles: [reader]}
tools:
  "wipe_*": {security_level: standard, capabilities: ["filesystem:write"], mode: audit_only}
"""
WIPER = {"scope": "mcp:read"}


@pytest.mark.parametrize(("hinted", "outcome", "reason", "would_deny"), [
    # destructiveHint asks for high: a rule in shadow names the tool, but enforces nothing, that hint included
    (LEVEL["high"], "denied", "level:role<high", ""),
    (0, "allowed", "role:reader:tool", "capability:filesystem:write"),  # the shadow rule still records its own
])
def test_a_rule_in_shadow_leaves_the_level_a_tools_annotations_ask_for_enforced(
        tmp_path: Path, hinted: int, outcome: str, reason: str, would_deny: str) -> None:
    policy = load_policy(_write(tmp_path, HINTED))
    decision = decide(principal_from(WIPER), operation_for("tools/call", "wipe_disk"), policy, hinted_level=hinted)
    assert (decision.outcome, decision.reason, decision.would_deny) == (outcome, reason, would_deny)


def test_tools_list_shows_the_level_a_tools_annotations_ask_for_when_only_a_shadow_rule_names_it(
        tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, HINTED))
    [row] = tool_rows(policy, "demo", [{"name": "wipe_disk", "annotations": {"destructiveHint": True}}])
    assert (row["tool"], row["level"], row["hints"]) == ("wipe_disk", "high", ["destructiveHint"])


APPROVING = """
mode: audit_only
roles:
  admin: {permissions: {can_execute_tools: ["*"]}}
  reader: {permissions: {can_execute_tools: [search]}}
bindings:
  - {when: {scope: "mcp:admin"}, roles: [admin]}
  - {when: {scope: "mcp:tools"}, roles: [reader]}
tools:
  transfer_funds: {approval: {approvers: ["role:admin"]}}
"""


@pytest.mark.parametrize(("claims", "tool", "reason", "would_deny", "approvers"), [
    # let through in shadow, the call still waits for a person: approvals are not shadowed
    (READER, "transfer_funds", "mode:audit_only", "no-grant:tool", ("role:admin",)),
    ({"scope": "mcp:admin"}, "transfer_funds", "role:admin:tool", "", ("role:admin",)),
    (READER, "search", "role:reader:tool", "", None),
])
def test_under_a_policy_in_audit_only_a_shadowed_call_still_needs_the_approval_its_tool_asks_for(
        tmp_path: Path, claims: dict[str, Any], tool: str, reason: str, would_deny: str,
        approvers: tuple[str, ...] | None) -> None:
    policy = load_policy(_write(tmp_path, APPROVING))
    decision = decide(principal_from(claims), operation_for("tools/call", tool), policy)
    assert (decision.allowed, decision.reason, decision.would_deny) == (True, reason, would_deny)
    assert (decision.approval.approvers if decision.approval is not None else None) == approvers


SHADOW_APPROVING: dict[str, Any] = {**SHADOW_POLICY, "tools": {"delete_file": {"approval": {
    "approvers": ["role:operator"], "mode": "retry", "timeout_s": 60}}}}


async def test_a_call_let_through_in_shadow_is_held_for_its_approval_and_never_reaches_the_upstream(
        tmp_path: Path) -> None:
    gateway = deploy("proxy", tmp_path, policy=SHADOW_APPROVING)
    try:
        async with _client(gateway, "auto", gateway.token("rae")) as reader:
            with pytest.raises(MCPError) as held:
                await reader.call_tool("delete_file", {"path": "/srv/x"})
            assert held.value.error.code == -32014 and held.value.error.data["approval_id"]
        assert gateway.recorder.tool_calls("delete_file") == []
        [event] = _tool_events(gateway, "delete_file")
        assert (event["result"], event["would_deny"], event["approval_required"], event["approval_granted"]) == (
            "denied", "no-grant:tool", 1, None)
    finally:
        gateway.stop()


SEARCH_ANSWERING = Operation("tool_call", "tools/call", 1, "search", input_responses=("sampling",))
UNKNOWN_ANSWER = Operation("tool_call", "tools/call", 1, "search", input_responses=("unknown",))

FIRM: list[tuple[str, dict[str, Any], Operation, bool, str, str, bool]] = [
    # (case, claims, operation, allowed, reason, would_deny, firm)
    ("a method the gateway does not know", READER, operation_for("admin/exec"), False, "unknown_methods:deny", "",
     True),
    ("an answer of no kind the gateway knows", READER, UNKNOWN_ANSWER, False, "input_response:unknown", "", True),
    ("an answer the caller may not give: the policy's rule, shadowed", READER, SEARCH_ANSWERING, True,
     "mode:audit_only", "input_response:sampling", False),
    ("an unreadable URI", READER, operation_for("resources/read", uri="file:///srv/docs/../../../etc/passwd"), False,
     "uri:'..' climbs above the root", "", True),
]


@pytest.mark.parametrize(("case", "claims", "operation", "allowed", "reason", "would_deny", "firm"), FIRM,
                         ids=[row[0] for row in FIRM])
def test_under_a_policy_in_audit_only_the_gateways_own_refusals_are_firm_and_still_refused(
        policies: dict[str, Policy], case: str, claims: dict[str, Any], operation: Operation, allowed: bool,
        reason: str, would_deny: str, firm: bool) -> None:
    decision = decide(principal_from(claims), operation, policies["whole"])
    assert (decision.allowed, decision.reason, decision.would_deny) == (allowed, reason, would_deny)
    assert decision.firm == firm


@pytest.mark.parametrize("mode", ["proxy", "middleware"])
def test_under_a_policy_in_audit_only_an_unknown_method_is_refused_and_never_reaches_the_upstream(
        tmp_path: Path, mode: str) -> None:
    gateway = deploy(mode, tmp_path, policy=SHADOW_POLICY)
    try:
        refused = _post(gateway, "admin/exec", {"command": "rm -rf /"}, gateway.token("rae"))
        assert refused.status_code == 404 and refused.json()["error"]["code"] == -32601
        assert gateway.recorder.requests == []
        assert [(e["operation"], e["result"], e["rule"], e["would_deny"]) for e in gateway.audit_events()] == [
            ("admin/exec", "denied", "unknown_methods:deny", None)]
    finally:
        gateway.stop()
