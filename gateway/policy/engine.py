"""`decide(principal, operation, policy) -> Decision`: the pure authorization decision.

Owns the mapping from an operation to the permission it needs, and the reason
recorded for every outcome. No I/O, no clock, no globals: the same inputs
always give the same `Decision`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.auth.principal import Principal
from gateway.mcp import Operation
from gateway.policy.model import Binding, Policy, Role

# Protocol plumbing every authenticated principal may use: without these no client can even connect
# (the SDK's auto mode falls back to the legacy handshake on any 4xx for server/discover).
_ALWAYS = frozenset({
    "initialize", "discover", "ping", "notification", "client_response", "task", "stream_open", "session_end",
})
# Operations open to any principal holding at least one role.
_ANY_ROLE = frozenset({"completion", "logging_set_level", "subscriptions_listen"})


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one operation.

    `reason` names the rule that decided (`role:reader:tool`, `no-role`, …),
    for the audit log always and for the client only under `deny_detail: explain`.
    `hidden` says the target is invisible to this principal, so a minimal
    refusal answers as the upstream would for an item that does not exist.
    """

    allowed: bool
    reason: str
    roles: tuple[str, ...]
    policy_version: str
    hidden: bool = False


def roles_for(principal: Principal, policy: Policy) -> tuple[str, ...]:
    """Every role the principal holds: granted directly, then by each matching binding, in policy order."""
    names = dict.fromkeys(r for r in sorted(principal.roles) if r in policy.roles)
    for binding in policy.bindings:
        if _binding_matches(binding, principal):
            names.update(dict.fromkeys(binding.roles))
    return tuple(names)


def _binding_matches(binding: Binding, principal: Principal) -> bool:
    if binding.scope is not None and binding.scope not in principal.scopes:
        return False
    if binding.client_id is not None and binding.client_id != principal.client_id:
        return False
    if binding.subject is not None and binding.subject != principal.subject:
        return False
    if binding.claim:
        for key, wanted in binding.claim.items():
            value = principal.claims.get(key)
            if isinstance(value, list):
                if wanted not in value:
                    return False
            elif value != wanted:
                return False
    return True


def decide(principal: Principal, operation: Operation, policy: Policy) -> Decision:
    """Allow or deny one classified operation for one principal."""
    roles = roles_for(principal, policy)

    def result(allowed: bool, reason: str, hidden: bool = False) -> Decision:
        return Decision(allowed, reason, roles, policy.version, hidden)

    kind = operation.kind
    if kind in _ALWAYS:
        return result(True, f"protocol:{kind}")
    if kind == "unknown":
        return result(policy.unknown_methods == "allow", f"unknown_methods:{policy.unknown_methods}")
    if not roles:
        return result(False, "no-role", hidden=kind in ("tool_call", "prompt_get", "resource_read"))
    held = [policy.roles[name] for name in roles]
    if kind in _ANY_ROLE:
        return result(True, f"role:{roles[0]}:{kind}")
    if kind == "list":
        if operation.method in ("resources/list", "resources/templates/list"):
            return _first(held, lambda r: r.can_list_resources, "list_resources", result)
        return result(True, f"role:{roles[0]}:list")
    if kind == "tool_call" and operation.name is not None:
        name = operation.name
        return _first(held, lambda r: r.tools.matches(name), "tool", result, hidden=True)
    if kind == "prompt_get" and operation.name is not None:
        name = operation.name
        return _first(held, lambda r: r.prompts.matches(name), "prompt", result, hidden=True)
    if kind in ("resource_read", "resource_subscribe", "resource_unsubscribe") and operation.uri is not None:
        uri = operation.uri
        return _first(held, lambda r: r.resources.matches(uri), "resource", result, hidden=True)
    if kind in ("sampling", "elicitation", "roots_list"):
        return _first(held, lambda r: r.can_request_sampling, "sampling", result)
    return result(False, f"unhandled:{kind}")


def _first(
    roles: list[Role],
    grants: Callable[[Role], bool],
    what: str,
    result: Callable[[bool, str, bool], Decision],
    hidden: bool = False,
) -> Decision:
    """Allowed by the first held role that grants `what`, else denied."""
    for role in roles:
        if grants(role):
            return result(True, f"role:{role.name}:{what}", False)
    return result(False, f"no-grant:{what}", hidden)
