"""The policy page's content: the compiled policy in force described for people, and "explain this call".

Owns `describe` (each role with its level, capabilities and what it grants; the bindings; each tool's,
resource's and prompt's requirements, approvals included) and `explain_call`, which turns the explain form
(subject, client, scopes, optional claims JSON, method, name, uri) into `policy.explain`'s lines, with the
roles assigned at runtime to that subject (and client) taken into account as they would be on a request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.policy.explain import explain, operation_for, principal_from
from gateway.policy.model import LEVELS

if TYPE_CHECKING:
    from gateway.policy.model import Requirements, Role
    from gateway.runtime import Runtime

EXPLAIN_FIELDS = ("subject", "client_id", "scopes", "claims", "method", "name", "uri", "upstream")
EXPLAIN_DEFAULTS: Mapping[str, str] = {"subject": "", "client_id": "", "scopes": "", "claims": "",
                                       "method": "tools/call", "name": "", "uri": "", "upstream": ""}


@dataclass(frozen=True, slots=True)
class RoleView:
    name: str
    level: str
    capabilities: tuple[str, ...]
    tools: tuple[str, ...]
    resources: tuple[str, ...]
    prompts: tuple[str, ...]
    may: tuple[str, ...]  # list resources, request sampling, elicit, list roots


@dataclass(frozen=True, slots=True)
class RequirementView:
    kind: str  # tool, resource, prompt
    pattern: str
    level: str
    capabilities: tuple[str, ...]
    approval: str  # "" when none


@dataclass(frozen=True, slots=True)
class PolicyView:
    source: str
    version: str
    roles: tuple[RoleView, ...]
    bindings: tuple[tuple[str, tuple[str, ...]], ...]  # (condition in words, roles)
    requirements: tuple[RequirementView, ...]
    unknown_methods: str
    deny_detail: str
    upstreams: tuple[str, ...]  # the config's: a call is explained as the policy holds on one of them


def _role(role: Role) -> RoleView:
    may = tuple(what for what, allowed in (
        ("list resources", role.can_list_resources), ("request sampling", role.can_request_sampling),
        ("elicit", role.can_elicit), ("list roots", role.can_list_roots)) if allowed)
    return RoleView(role.name, LEVELS[role.level], tuple(sorted(role.capabilities)), role.tools.patterns,
                    role.resources.patterns, role.prompts.patterns, may)


def _requirements(kind: str, requirements: Requirements) -> list[RequirementView]:
    out = []
    for pattern, rule in zip(requirements.index.patterns, requirements.rules, strict=True):
        approval = rule.approval
        text = "" if approval is None else (
            f"{' or '.join(approval.approvers)} approve each call ({approval.mode}, {approval.timeout_s:g} s"
            + (", self-approval allowed)" if approval.allow_self_approval else ")"))
        out.append(RequirementView(kind, pattern, rule.security_level, rule.capabilities, text))
    return out


def describe(runtime: Runtime) -> PolicyView:
    """The policy in force, as the policy page shows it."""
    policy = runtime.policy
    bindings = tuple((", ".join(f"{k} = {v if isinstance(v, str) else json.dumps(v)}"
                                for k, v in b.when.model_dump(exclude_none=True).items()), b.roles)
                     for b in policy.bindings)
    requirements = (*_requirements("tool", policy.tools), *_requirements("resource", policy.resources),
                    *_requirements("prompt", policy.prompts))
    return PolicyView(policy.source, policy.version, tuple(_role(r) for r in policy.roles.values()), bindings,
                      requirements, policy.unknown_methods, policy.deny_detail,
                      tuple(u.name for u in runtime.config.upstreams))


async def explain_call(runtime: Runtime, asked: Mapping[str, str]) -> list[str]:
    """`explain`'s lines for the call the form describes; ValueError saying which field is wrong."""
    claims: dict[str, Any] = {}
    if asked.get("claims", "").strip():
        try:
            claims = json.loads(asked["claims"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"claims: not JSON ({exc.msg})") from None
        if not isinstance(claims, dict):
            raise ValueError("claims: must be a JSON object")
    for field, claim in (("subject", "sub"), ("client_id", "client_id")):
        if asked.get(field, "").strip():
            claims[claim] = asked[field].strip()
    if asked.get("scopes", "").strip():
        claims["scope"] = " ".join(asked["scopes"].split())
    try:
        principal = principal_from(claims)
    except ValueError as exc:
        raise ValueError(f"claims: {exc}") from None
    method = asked.get("method", "").strip()
    if not method:
        raise ValueError("method: required (tools/call, resources/read, ...)")
    try:
        operation = operation_for(method, asked.get("name", "").strip() or None, asked.get("uri", "").strip() or None)
    except ValueError as exc:
        raise ValueError(f"{method}: {exc}") from None
    upstream = asked.get("upstream", "").strip()
    names = [u.name for u in runtime.config.upstreams]
    if upstream and upstream not in names:
        raise ValueError(f"upstream: one of {', '.join(names)}")
    assigned = await runtime.assignments.of(principal.subject, principal.client_id)
    return explain(runtime.policy, principal, operation, assigned, upstream=upstream or names[0]).lines()
