"""decide() as a specification: (principal, operation) -> expected decision, table by table."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.mcp import Operation
from gateway.policy import DecisionCache, Policy, PolicyError, decide, load_policy, normalize_uri
from gateway.policy.globs import GlobIndex
from gateway.policy.uri import InvalidUri, template_probe
from gateway.principal import Principal

ROOT = Path(__file__).resolve().parent.parent

POLICY: dict[str, Any] = {
    "roles": {
        "reader": {
            "security_level": "standard",
            "capabilities": ["filesystem:read", "network:connect"],
            "permissions": {
                "can_list_resources": True,
                "can_read_resources": ["file:///srv/docs/**", "db://reports/*"],
                "can_execute_tools": ["search", "get_*"],
                "can_access_prompts": ["summarize"],
                "can_request_sampling": False,
            },
        },
        "operator": {
            "inherits": ["reader"],
            "security_level": "critical",
            "capabilities": ["filesystem:write", "process:create", "process:terminate", "system:monitor"],
            "permissions": {"can_execute_tools": ["*"], "can_request_sampling": True, "can_elicit": True},
        },
        "writer": {
            "security_level": "standard",
            "capabilities": ["filesystem:write"],
            "permissions": {"can_execute_tools": ["delete_*"]},
        },
        "auditor": {"security_level": "low", "permissions": {"can_execute_tools": ["run_command"]}},
    },
    "bindings": [
        {"when": {"scope": "mcp:tools"}, "roles": ["reader"]},
        {"when": {"scope": "mcp:admin"}, "roles": ["operator"]},
        {"when": {"claim": {"groups": "ops"}}, "roles": ["operator"]},
        {"when": {"client_id": "ci-bot"}, "roles": ["reader"]},
        {"when": {"scope": "mcp:write", "client_id": "editor"}, "roles": ["writer"]},
        {"when": {"subject": "audrey"}, "roles": ["auditor"]},
    ],
    "tools": {
        "delete_*": {"security_level": "critical", "capabilities": ["filesystem:write"]},
        "run_command": {"security_level": "high", "capabilities": ["process:create"]},
    },
    "resources": {"file:///srv/docs/secret/**": {"security_level": "high"}},
    "authentication_levels": {
        "rules": [
            {"when": {"amr": "hwk"}, "level": "critical"},
            {"when": {"amr": "mfa"}, "level": "high"},
            {"when": {"acr": "urn:example:phishing-resistant"}, "level": "critical"},
        ],
        "default": "standard",
    },
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    return load_policy(path)


def who(subject: str = "alice", *, scopes: tuple[str, ...] = (), client_id: str | None = None,
        amr: tuple[str, ...] = (), acr: str | None = None, **claims: Any) -> Principal:
    return Principal(subject=subject, issuer="https://idp", client_id=client_id, scopes=frozenset(scopes),
                     claims=claims, amr=frozenset(amr), acr=acr)


READER = who(scopes=("mcp:tools",))
OPS = who("olga", groups=["ops"])
OPS_MFA = who("olga", groups=["ops"], amr=("pwd", "mfa"))
OPS_HWK = who("olga", groups=["ops"], amr=("hwk",))
NOBODY = who("nobody")


def tool(name: str) -> Operation:
    return Operation("tool_call", "tools/call", 1, name=name)


def read(uri: str) -> Operation:
    return Operation("resource_read", "resources/read", 1, uri=uri)


TABLE: list[tuple[str, Principal, Operation, str, str]] = [
    # (case, principal, operation, outcome, reason)
    ("reader calls an exact tool", READER, tool("search"), "allowed", "role:reader:tool"),
    ("reader calls a glob tool", READER, tool("get_weather"), "allowed", "role:reader:tool"),
    ("reader calls an ungranted tool", READER, tool("delete_file"), "insufficient_scope", "no-grant:tool"),
    ("names are case-sensitive", READER, tool("Search"), "insufficient_scope", "no-grant:tool"),
    ("no Unicode folding", READER, tool("search\u200b"), "insufficient_scope", "no-grant:tool"),
    ("glob * stays within a segment (for every role)", READER, tool("get_a/b"), "denied", "no-grant:tool"),
    ("operator needs mfa for a high tool", OPS, tool("run_command"), "step_up", "level:authentication<high"),
    ("operator with mfa runs a high tool", OPS_MFA, tool("run_command"), "allowed", "role:operator:tool"),
    ("mfa is not enough for critical", OPS_MFA, tool("delete_file"), "step_up", "level:authentication<critical"),
    ("hardware key reaches critical", OPS_HWK, tool("delete_file"), "allowed", "role:operator:tool"),
    ("role level below the tool's", who("ed", scopes=("mcp:write",), client_id="editor", amr=("hwk",)),
     tool("delete_file"), "insufficient_scope", "level:role<critical"),
    ("role without the capability", who("audrey", amr=("hwk",)), tool("run_command"), "insufficient_scope",
     "capability:process:create"),
    ("a scope would grant it", READER, tool("run_command"), "insufficient_scope", "no-grant:tool"),
    ("no role at all", NOBODY, tool("search"), "denied", "no-role"),
    ("client binding", who("bot", client_id="ci-bot"), tool("search"), "allowed", "role:reader:tool"),
    ("claim array contains", who("x", groups=["dev", "ops"]), tool("anything"), "allowed", "role:operator:tool"),
    ("claim value must match exactly", who("x", groups="opsx"), tool("search"), "denied", "no-role"),
    ("** crosses segments", READER, read("file:///srv/docs/a/b/c.md"), "allowed", "role:reader:resource"),
    ("db glob within one segment", READER, read("db://reports/q3"), "allowed", "role:reader:resource"),
    ("db glob does not cross", READER, read("db://reports/q3/raw"), "denied", "no-grant:resource"),
    ("reader's level is below the resource's", READER, read("file:///srv/docs/secret/keys"), "insufficient_scope",
     "level:role<high"),
    ("operator with mfa reads a high resource", OPS_MFA, read("file:///srv/docs/secret/keys"), "allowed",
     "role:operator:resource"),
    ("traversal out of the root", READER, read("file:///srv/docs/../etc/passwd"), "denied", "no-grant:resource"),
    ("encoded traversal", READER, read("file:///srv/docs/%2e%2e/%2E%2E/etc/passwd"), "denied", "no-grant:resource"),
    ("traversal above /", READER, read("file:///srv/docs/../../../../etc/passwd"), "denied",
     "uri:'..' climbs above the root"),
    ("encoded slash", READER, read("file:///srv/docs/..%2f..%2fetc/passwd"), "denied", "uri:encoded slash in URI path"),
    ("NUL byte", READER, read("file:///srv/docs/a%00.md"), "denied", "uri:encoded NUL byte in URI"),
    # a file system collapses `//`: /srv/docs//secret is /srv/docs/secret, whose level `//` would have dodged
    ("an empty segment in a file URI", READER, read("file:///srv/docs//secret/keys"), "denied",
     "uri:an empty segment in a file URI: a file system collapses it, a pattern does not"),
    ("dot segments beside an empty one", READER, read("file:///srv/docs/a//../../etc/shadow"), "denied",
     "uri:an empty segment in a file URI: a file system collapses it, a pattern does not"),
    ("the same in another scheme", READER, read("db://reports/a//../../x"), "denied",
     "uri:an empty segment with dot segments: readers disagree on where `..` leads"),
    ("backslash in a file URI", READER, read("file:///srv/docs/..\\..\\etc\\passwd"), "denied",
     "uri:backslash in file URI"),
    ("traversal that stays inside", READER, read("file:///srv/docs/a/../readme"), "allowed", "role:reader:resource"),
    ("scheme case is normalised", READER, read("FILE:///srv/docs/readme"), "allowed", "role:reader:resource"),
    ("prompt granted", READER, Operation("prompt_get", "prompts/get", 1, name="summarize"), "allowed",
     "role:reader:prompt"),
    ("prompt not granted", READER, Operation("prompt_get", "prompts/get", 1, name="jailbreak"), "denied",
     "no-grant:prompt"),
    ("list resources", READER, Operation("list", "resources/list", 1), "allowed", "role:reader:list_resources"),
    ("list resources needs the flag", who("audrey"), Operation("list", "resources/list", 1), "denied",
     "no-grant:list_resources"),
    ("tools/list is open to any role", who("audrey"), Operation("list", "tools/list", 1), "allowed",
     "role:auditor:list"),
    ("sampling denied to readers", READER, Operation("sampling", "sampling/createMessage", 5), "denied",
     "no-grant:sampling"),
    ("sampling granted to operators", OPS, Operation("sampling", "sampling/createMessage", 5), "allowed",
     "role:operator:sampling"),
    ("elicitation needs can_elicit", READER, Operation("elicitation", "elicitation/create", 5), "denied",
     "no-grant:elicitation"),
    ("roots need can_list_roots", OPS, Operation("roots_list", "roots/list", 5), "denied", "no-grant:roots_list"),
    ("a retry answering sampling the reader may not do", READER,
     Operation("tool_call", "tools/call", 1, name="search", input_responses=("sampling",)), "denied",
     "input_response:sampling"),
    ("completion for a granted prompt", READER, Operation("completion", "completion/complete", 1, name="summarize"),
     "allowed", "role:reader:prompt"),
    ("completion for a readable template", READER,
     Operation("completion", "completion/complete", 1, uri="file:///srv/docs/{name}"), "allowed",
     "role:reader:resource"),
    ("completion for an unreadable template", READER,
     Operation("completion", "completion/complete", 1, uri="file:///etc/{name}"), "denied", "no-grant:resource"),
    ("discover for anyone", NOBODY, Operation("discover", "server/discover", 1), "allowed", "protocol:discover"),
    ("initialize for anyone", NOBODY, Operation("initialize", "initialize", 1), "allowed", "protocol:initialize"),
    ("unknown method", OPS, Operation("unknown", "admin/shutdown", 1), "denied", "unknown_methods:deny"),
]


@pytest.mark.parametrize(("case", "principal", "operation", "outcome", "reason"), TABLE, ids=[r[0] for r in TABLE])
def test_decide(policy: Policy, case: str, principal: Principal, operation: Operation, outcome: str,
                reason: str) -> None:
    decision = decide(principal, operation, policy)
    assert (decision.outcome, decision.reason) == (outcome, reason)
    assert decision.allowed == (outcome == "allowed")
    assert decision.policy_version == policy.version


def test_the_decision_cache_answers_exactly_as_decide_does(policy: Policy, tmp_path: Path) -> None:
    cache = DecisionCache()
    for _, principal, operation, _, _ in TABLE * 2:  # the second pass is answered from the cache
        assert cache(principal, operation, policy) == decide(principal, operation, policy)
    # Another policy (a reload) or another principal is never answered from the first one's entries.
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**POLICY, "roles": {
        **POLICY["roles"], "reader": {**POLICY["roles"]["reader"], "permissions": {}}}}))
    reloaded = load_policy(tmp_path / "p.yaml")
    tool = Operation("tool_call", "tools/call", 1, name="search")
    assert cache(READER, tool, policy).allowed and not cache(READER, tool, reloaded).allowed
    assert not cache(NOBODY, tool, policy).allowed


def test_step_up_names_the_level_and_the_acr_that_reaches_it(policy: Policy) -> None:
    decision = decide(OPS_MFA, tool("delete_file"), policy)
    assert (decision.required_level, decision.acr_values) == ("critical", ("urn:example:phishing-resistant",))
    assert decision.visible and not decision.hidden


def test_insufficient_scope_names_the_scope_that_would_grant(policy: Policy) -> None:
    decision = decide(READER, tool("run_command"), policy)
    assert decision.scopes == ("mcp:admin",)
    assert decision.hidden


def test_scope_hint_skips_bindings_whose_other_conditions_fail(policy: Policy) -> None:
    # mcp:write binds writer only for client "editor"; alice with another client is not told to ask for it.
    decision = decide(who(amr=("hwk",), scopes=("mcp:tools",), client_id="other"), tool("delete_file"), policy)
    assert "mcp:write" not in decision.scopes


def test_roles_from_every_binding_in_policy_order(policy: Policy) -> None:
    principal = who("audrey", scopes=("mcp:tools", "mcp:admin"), client_id="ci-bot")
    assert decide(principal, tool("search"), policy).roles == ("reader", "operator", "auditor")


def test_the_decided_uri_is_the_normalised_one(policy: Policy) -> None:
    decision = decide(READER, read("FILE:///srv/docs/a/./b/../%7Euser"), policy)
    assert decision.uri == "file:///srv/docs/a/~user"


URIS = [
    ("HTTPS://Example.COM/a/%7efoo", "https://example.com/a/~foo"),
    ("file:///srv/docs/%41bc", "file:///srv/docs/Abc"),
    ("file:///srv/docs/a%20b", "file:///srv/docs/a%20b"),
    ("file:///srv/docs/a%2fb", InvalidUri),
    ("file:///a/./b/../c/", "file:///a/c/"),
    ("db://reports/q3?x=%7e", "db://reports/q3?x=~"),
    ("file:///../x", InvalidUri),
    ("file:///srv/%00", InvalidUri),
    ("file:///srv/a\nb", InvalidUri),
    ("no-scheme/path", InvalidUri),
    ("file:///srv/%zz", InvalidUri),
]


@pytest.mark.parametrize(("uri", "expected"), URIS)
def test_uri_normalisation(uri: str, expected: object) -> None:
    if expected is InvalidUri:
        with pytest.raises(InvalidUri):
            normalize_uri(uri)
    else:
        assert normalize_uri(uri) == expected


def test_template_probe_stands_for_one_expansion() -> None:
    assert template_probe("file:///srv/docs/{name}") == "file:///srv/docs/x"
    assert template_probe("db://{+path}/rows{?limit}") == "db://x/rowsx"


def test_names_match_exactly_as_sent() -> None:
    index = GlobIndex(["search", "get_*"])
    assert [index.matches(n) for n in ("search", "Search", "search\u200b", "\uff53earch", "get_x", "GET_x")] == [
        True, False, False, False, True, False]


def test_glob_index_finds_every_matching_pattern() -> None:
    index = GlobIndex(["a/*", "a/**", "a/b", "*", "**", "get_*", "x"])
    assert sorted(index.matching("a/b")) == [0, 1, 2, 4]
    assert sorted(index.matching("get_it")) == [3, 4, 5]
    assert not GlobIndex([]).matches("anything")
    assert GlobIndex(["prefix-" + "z" * 40 + "*"]).matches("prefix-" + "z" * 40 + "tail")


BAD = [
    ({"roles": {"a": {"capabilities": ["filesystem:teleport"]}}}, "unknown capability filesystem:teleport"),
    ({"roles": {"a": {"security_level": "extreme"}}}, "roles.a.security_level"),
    ({"roles": {"a": {}}, "tools": {"x": {"security_level": "max"}}}, "tools.x.security_level"),
    ({"roles": {"a": {}}, "authentication_levels": {"rules": [{"when": {}, "level": "high"}]}},
     "at least one of"),
]


@pytest.mark.parametrize(("policy_doc", "problem"), BAD, ids=[p for _, p in BAD])
def test_bad_policy_says_where_and_why(tmp_path: Path, policy_doc: dict[str, Any], problem: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy_doc))
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert any(line.startswith(f"{path}: ") and problem in line for line in raised.value.problems), raised.value


SHIPPED = sorted(p for p in (ROOT / "policies").glob("*.yaml") if not p.name.endswith(".tests.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_policy_loads_and_passes_its_own_test_cases(path: Path) -> None:
    assert load_policy(path).roles
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "test", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout and " cases pass" in done.stdout


def test_policy_test_reports_a_failing_case_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(POLICY))
    (tmp_path / "p.tests.yaml").write_text(yaml.safe_dump({"cases": [
        {"name": "wrong on purpose", "claims": {"sub": "a", "scope": "mcp:tools"}, "method": "tools/call",
         "tool": "search", "expect": "denied"},
        {"name": "right", "claims": {"sub": "a", "scope": "mcp:tools"}, "method": "tools/call", "tool": "search",
         "expect": "allowed", "reason": "role:reader:tool"},
    ]}))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "test", str(tmp_path / "p.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "FAIL  wrong on purpose  (got allowed (role:reader:tool))" in done.stdout
    assert "PASS  right" in done.stdout and "1 of 2 cases pass" in done.stdout


def test_policy_explain_says_what_decided_and_what_would_change_it(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(POLICY))
    (tmp_path / "claims.json").write_text('{"sub": "olga", "groups": ["ops"], "amr": ["mfa"]}')
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "explain", "--policy",
                           str(tmp_path / "p.yaml"), "--claims", str(tmp_path / "claims.json"),
                           "--method", "tools/call", "--name", "delete_file"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "decision:   step_up (visible)"
    assert "rule:       level:authentication<critical" in lines
    assert any(line.startswith("  operator") and "bindings[2] (claim={'groups': 'ops'})" in line for line in lines)
    assert "auth level: high" in lines
    assert "requires:   level critical, capabilities filesystem:write" in lines
    assert "  - authentication reaching level critical (acr urn:example:phishing-resistant)" in lines


def test_explain_proposes_only_roles_that_would_change_the_outcome_for_this_very_principal(tmp_path: Path) -> None:
    from gateway.policy.explain import explain, operation_for, principal_from

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "roles": {"runner": {"security_level": "high", "permissions": {"can_execute_tools": ["run"]}}},
        "tools": {"run": {"security_level": "high"}},
        "authentication_levels": {"default": "standard", "rules": [{"when": {"amr": "hwk"}, "level": "critical"}]},
    }))
    policy = load_policy(tmp_path / "p.yaml")
    # A hardware key, but a client whose ceiling is "standard": no role can make `run` allowed for it.
    capped = principal_from({"sub": "bot", "amr": ["hwk"], "gateway_level": "standard"})
    assert explain(policy, capped, operation_for("tools/call", "run")).would_change == [
        "no role in this policy grants it"]
    uncapped = principal_from({"sub": "bot", "amr": ["hwk"]})
    assert explain(policy, uncapped, operation_for("tools/call", "run")).would_change == [
        "role runner (no binding gives it)"]


def test_every_operation_field_decide_reads_is_in_the_decision_cache_key(policy: Policy) -> None:
    from dataclasses import fields

    from gateway.policy.engine import _NOT_READ_BY_DECIDE

    cache = DecisionCache()
    base = Operation("tool_call", "tools/call", 1, name="search")
    assert cache(READER, base, policy).allowed
    # The same call answering a sampling request the reader may not answer: a field beyond name and uri.
    assert not cache(READER, replace(base, input_responses=("sampling",)), policy).allowed
    assert _NOT_READ_BY_DECIDE == {"request_id", "arguments"} <= {f.name for f in fields(Operation)}


def test_a_policy_test_case_with_a_claim_of_the_wrong_type_fails_as_malformed(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(POLICY))
    (tmp_path / "p.tests.yaml").write_text(yaml.safe_dump({"cases": [
        {"name": "scope as a list", "claims": {"sub": "a", "scope": ["mcp:tools"]}, "method": "tools/call",
         "tool": "search", "expect": "allowed"}]}))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "test", str(tmp_path / "p.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "malformed case: claim scope must be a space-separated string" in done.stdout
