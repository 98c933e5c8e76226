"""Policy tools for people: why a decision came out as it did, and policy test cases in YAML.

Owns `explain()` (the decision, the roles and the bindings or runtime
assignments that gave them, what the item requires, and what would change the
outcome) and the policy test-case file format run by `mcp-gateway policy test`:

    policy: default.yaml              # optional: default is the file this one sits beside (NAME.tests.yaml);
                                      # `mcp-gateway policy test CASES --policy FILE` runs them against another
    cases:
      - name: a reader may search
        claims: {sub: alice, scope: "mcp:tools"}
        method: tools/call            # any MCP method; tool:, prompt: or uri: names the target
        tool: search
        upstream: files               # optional: decided as the policy holds on this upstream (upstreams: NAME)
        expect: allowed               # allowed | denied | step_up | insufficient_scope | would_deny
        reason: role:reader:tool      # optional: the exact rule expected to decide
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.assignments import Assignment
from gateway.jsonrpc import Message
from gateway.mcp import MalformedParams, Operation, classify, classify_server_request
from gateway.policy.engine import Decision, authentication_level, decide, holds, roles_for
from gateway.policy.model import LEVELS, Policy, PolicyError, load_policy
from gateway.policy.uri import InvalidUri, normalize_uri
from gateway.principal import Principal, principal_from_claims
from gateway.yamlfile import YamlFileError, format_validation, read_yaml


def principal_from(claims: Mapping[str, Any]) -> Principal:
    """A principal from token-like claims; `sub` and `iss` get placeholders when absent."""
    return principal_from_claims({"sub": "anonymous", "iss": "policy-tool", **claims})


def operation_for(method: str, name: str | None = None, uri: str | None = None,
                  max_tokens: int | None = None) -> Operation:
    """The operation a request with this method and target (and, for sampling, `maxTokens`) would be classified
    as."""
    params: dict[str, Any] = {} if max_tokens is None else {"maxTokens": max_tokens}
    if method == "completion/complete":
        params["ref"] = {"type": "ref/prompt", "name": name} if name else {"type": "ref/resource", "uri": uri}
    elif name is not None:
        params["name"] = name
    elif uri is not None:
        params["uri"] = uri
    message = Message("request", 1, method, params, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    if method in ("sampling/createMessage", "elicitation/create", "roots/list"):
        return classify_server_request(message)
    return classify(message)


@dataclass
class Explanation:
    decision: Decision
    operation: Operation
    principal: Principal
    role_sources: dict[str, list[str]]
    authentication_level: str
    requirement: str | None
    would_change: list[str] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # assigned roles this policy does not define

    def lines(self) -> list[str]:
        d, op = self.decision, self.operation
        target = f" {op.target}" if op.target else ""
        out = [
            f"decision:   {d.outcome}" + ("" if d.allowed else f" ({'hidden' if d.hidden else 'visible'})"),
            f"operation:  {op.method}{target}" + (f"  (decided as {d.uri})" if d.uri and d.uri != op.uri else ""),
            f"rule:       {d.reason}",
            *([f"would deny: {d.would_deny} (a rule in mode audit_only: recorded, not enforced)"]
              if d.would_deny else []),
            f"policy:     version {d.policy_version}",
        ]
        if self.role_sources:
            out.append("roles:")
            out.extend(f"  {role:<12} from {', '.join(sources)}" for role, sources in self.role_sources.items())
        else:
            out.append("roles:      none")
        out.extend(f"  {role:<12} ignored, not a role of this policy: {', '.join(sources)}"
                   for role, sources in self.ignored.items())
        out.append(f"auth level: {self.authentication_level}")
        if self.requirement:
            out.append(f"requires:   {self.requirement}")
        if self.would_change:
            out.append("would change it:")
            out.extend(f"  - {change}" for change in self.would_change)
        return out


def explain(policy: Policy, principal: Principal, operation: Operation,
            assignments: Sequence[Assignment] = (), *, era: str = "", upstream: str = "") -> Explanation:
    """`assignments`: the principal's active runtime role assignments, whose roles it holds on top of its own.
    `upstream`: decided as the policy holds there (its view, and a Cedar policy's `context.upstream`)."""
    policy = policy.for_upstream(upstream) if upstream else policy
    sources: dict[str, list[str]] = {role: ["the authenticator"] for role in sorted(principal.roles)}
    for a in assignments:
        sources.setdefault(a.role, []).append(_assigned(a))
    principal = replace(principal, roles=principal.roles | {a.role for a in assignments})
    decision = decide(principal, operation, policy, era=era, upstream=upstream)
    for index, binding in enumerate(policy.bindings):
        if holds(binding.when, principal):
            test = ", ".join(f"{k}={v}" for k, v in binding.when.model_dump(exclude_none=True).items())
            for role in binding.roles:
                sources.setdefault(role, []).append(f"bindings[{index}] ({test})")
    requirement = _requirement(policy, operation) if policy.engine is None else None
    changes: list[str] = []
    if decision.outcome == "insufficient_scope":
        changes.append(f"a token with scope {' or '.join(decision.scopes)}")
    elif decision.outcome == "step_up":
        how = f" (acr {' or '.join(decision.acr_values)})" if decision.acr_values else ""
        changes.append(f"authentication reaching level {decision.required_level}{how}")
    elif not decision.allowed and policy.engine is not None:  # a Cedar policy: its rules are its own to read
        changes.append(f"a permit in {policy.source} that holds for this principal" if decision.reason.startswith(
            "no-grant:") else f"the forbid {decision.reason} not holding ({decision.detail or 'see the policy'})")
    elif not decision.allowed:
        changes.extend(_roles_that_would_grant(policy, principal, operation, era, upstream))
    level = (LEVELS[authentication_level(principal, policy)] if policy.engine is None else
             f"as the Cedar policy reads amr ({', '.join(sorted(principal.amr)) or 'none'}), acr "
             f"({principal.acr or 'none'}) and max_level ({principal.max_level or 'none'})")
    return Explanation(decision, operation, principal, {r: sources.get(r, []) for r in roles_for(principal, policy)},
                       level, requirement, changes,
                       {a.role: sources[a.role] for a in assignments
                        if policy.engine is None and a.role not in policy.roles})


def _assigned(a: Assignment) -> str:
    until = ("until revoked" if a.expires_at is None
             else f"expires {datetime.fromtimestamp(a.expires_at, UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}")
    client = f", client {a.client_id}" if a.client_id is not None else ""
    reason = f", reason {json.dumps(a.reason, ensure_ascii=False)}" if a.reason else ""
    return f"assigned (id {a.id}, by {a.assigned_by}{client}, {until}{reason})"


def _requirement(policy: Policy, operation: Operation) -> str | None:
    if operation.kind == "tool_call" and operation.name:
        level, caps = policy.tools.of(operation.name)
    elif operation.kind == "prompt_get" and operation.name:
        level, caps = policy.prompts.of(operation.name)
    elif operation.uri and operation.kind.startswith("resource"):
        try:
            level, caps = policy.resources.of(normalize_uri(operation.uri))
        except InvalidUri:
            return None
    else:
        return None
    return f"level {LEVELS[level]}" + (f", capabilities {', '.join(sorted(caps))}" if caps else "")


def _roles_that_would_grant(policy: Policy, principal: Principal, operation: Operation, era: str,
                            upstream: str) -> list[str]:
    out = []
    for name in policy.roles:
        with_role = replace(principal, roles=frozenset({name}))  # everything else kept: a ceiling too
        if decide(with_role, operation, policy, era=era, upstream=upstream).allowed:
            bound = [f"bindings[{i}]" for i, b in enumerate(policy.bindings) if name in b.roles]
            out.append(f"role {name}" + (f" (given by {', '.join(bound)})" if bound else " (no binding gives it)"))
    return out or ["no role in this policy grants it"]


# ---- policy test cases -------------------------------------------------------------------------


class _Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    claims: dict[str, Any] = Field(default_factory=dict)
    method: str
    uri: str | None = None
    tool: str | None = None
    prompt: str | None = None
    upstream: str | None = None  # decided as the policy holds on this upstream (its `upstreams:` section)
    era: Literal["legacy", "modern"] | None = None  # the protocol era the request came in (a Cedar context.era)
    max_tokens: int | None = None  # sampling/createMessage: the maxTokens the server asks for
    # would_deny: allowed only because a rule that refuses it (or the whole policy) is in mode audit_only
    expect: Literal["allowed", "denied", "step_up", "insufficient_scope", "would_deny"]
    reason: str | None = None


class _CaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str | None = None
    cases: tuple[_Case, ...] = Field(min_length=1)


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    got: str


def cases_path_for(path: Path) -> tuple[Path, Path]:
    """(test-case file, policy file) for a path naming either one."""
    if path.name.endswith(".tests.yaml"):
        return path, path.with_name(path.name.removesuffix(".tests.yaml") + ".yaml")
    return path.with_name(f"{path.stem}.tests.yaml"), path


def run_cases(path: Path, policy_path: Path | None = None) -> tuple[Policy, list[CaseResult]]:
    """Load the policy and its test cases; run each. PolicyError for an invalid policy or case file.
    `policy_path`: run the cases against this policy instead (one in another language, say: the same cases
    passing under two policies is what makes them equivalent)."""
    cases_file, policy_file = cases_path_for(path)
    try:
        raw, _ = read_yaml(cases_file)
    except YamlFileError as exc:
        raise PolicyError(exc.problems) from None
    try:
        spec = _CaseFile.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(format_validation(str(cases_file), exc)) from None
    if spec.policy is not None:
        policy_file = cases_file.parent / spec.policy
    policy = load_policy(policy_path or policy_file)
    results = []
    for case in spec.cases:
        target = case.tool or case.prompt
        try:
            operation = operation_for(case.method, target, case.uri, case.max_tokens)
        except MalformedParams as exc:
            results.append(CaseResult(case.name, False, f"malformed case: {exc}"))
            continue
        try:
            principal = principal_from(case.claims)
        except ValueError as exc:  # a claim of the wrong type: the gateway would refuse such a token
            results.append(CaseResult(case.name, False, f"malformed case: {exc}"))
            continue
        decision = decide(principal, operation, policy.for_upstream(case.upstream) if case.upstream else policy,
                          era=case.era or "", upstream=case.upstream or "")
        outcome = "would_deny" if decision.would_deny else decision.outcome
        reason = decision.would_deny or decision.reason
        passed = outcome == case.expect and (case.reason is None or case.reason == reason)
        results.append(CaseResult(case.name, passed, f"{outcome} ({reason})"))
    return policy, results
