"""`decide(principal, operation, policy) -> Decision`: the pure authorization decision.

Owns the mapping from an operation to what it needs, and the reason recorded
for every outcome. No I/O, no clock, no globals: the same inputs always give
the same `Decision`.

    operation                         needs (from one role that has all of it)
    tools/call name                   name in can_execute_tools + the tool's level and capabilities
    prompts/get name                  name in can_access_prompts + the prompt's requirements
    resources/read|subscribe uri      normalised uri in can_read_resources + the resource's requirements
    resources/list, templates/list    can_list_resources
    completion/complete ref           the referenced prompt, or a readable expansion of the template
    sampling / elicitation / roots    can_request_sampling / can_elicit / can_list_roots
    tools/list, prompts/list, ...     any role (the results are filtered item by item)
    initialize, discover, ping, ...   nothing: protocol plumbing, open to every authenticated principal

A tool whose requirement names an `approval` is allowed with `Decision.approval`
set: whether a person approved this very call is the approval gate's question
(`gateway.approvals`), asked after the decision and before forwarding.

The effective level is min(the granting role's level, the authentication
level). Short of the role's level: denied. Short of the authentication level
only: `step_up` (RFC 9470). When a scope the principal lacks would bind a role
that grants it all: `insufficient_scope`, naming the first such scope.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from operator import attrgetter
from typing import Any, Literal

from gateway.mcp import PROTOCOL_KINDS, Operation
from gateway.policy.globs import GlobIndex
from gateway.policy.model import LEVEL, LEVELS, ApprovalSpec, Condition, Policy, Requirements, Role
from gateway.policy.uri import InvalidUri, normalize_uri, template_probe
from gateway.principal import Principal

Outcome = Literal["allowed", "denied", "step_up", "insufficient_scope", "rate_limited"]

_ANY_ROLE = frozenset({"logging_set_level", "subscriptions_listen"})
_CLIENT_FEATURE: dict[str, Callable[[Role], bool]] = {
    "sampling": lambda r: r.can_request_sampling,
    "elicitation": lambda r: r.can_elicit,
    "roots_list": lambda r: r.can_list_roots,
}


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one operation.

    `reason` names the rule or check that decided (`role:reader:tool`,
    `no-grant:tool`, `level:role`, `uri:'..' climbs above the root`, …): for
    the audit log always, for the client only under `deny_detail: explain`.
    `hidden` says the target is not among what this principal can see, so a
    minimal refusal answers as the upstream would for an item that does not exist.
    """

    allowed: bool
    reason: str
    roles: tuple[str, ...]
    policy_version: str
    outcome: Outcome = "allowed"
    hidden: bool = False
    required_level: str | None = None
    acr_values: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    uri: str | None = None  # the normalised URI the decision was taken on
    approval: ApprovalSpec | None = None  # an allowed tool call that a person must approve before it is forwarded
    per_hour: int | None = None  # an allowed sampling request: how many a principal may pass on in an hour
    retry_after_s: int | None = None  # rate_limited: when the rule that refused it has a token again
    detail: str = ""  # why, in words, beyond `reason` (which argument broke which constraint), for explain
    # under `mode: audit_only` (the policy's or a rule's): the refusal this allowed decision would have been
    would_deny: str = ""
    # a refusal that is the gateway's own reading, no rule of the policy (a URI it cannot read safely, a method or
    # an answer it does not know): refused in mode audit_only too, since nothing unclassified is forwarded
    firm: bool = False

    @property
    def visible(self) -> bool:
        """Whether a list result may show the item: usable now, or after stronger authentication."""
        return self.outcome in ("allowed", "step_up")


def holds(when: Condition, principal: Principal, *, ignore_scope: bool = False) -> bool:
    """Every test in `when` holds for `principal`."""
    if when.scope is not None and not ignore_scope and when.scope not in principal.scopes:
        return False
    if when.client_id is not None and when.client_id != principal.client_id:
        return False
    if when.subject is not None and when.subject != principal.subject:
        return False
    if when.amr is not None and when.amr not in principal.amr:
        return False
    if when.acr is not None and when.acr != principal.acr:
        return False
    if when.claim:
        for key, wanted in when.claim.items():
            value = principal.claims.get(key)
            if isinstance(value, list) and wanted in value:
                continue
            if value != wanted or isinstance(value, list):
                return False
    return True


def roles_for(principal: Principal, policy: Policy) -> tuple[str, ...]:
    """Every role the principal holds: granted directly, then by each matching binding, in policy order."""
    if policy.engine is not None:  # a Cedar policy has no roles or bindings: the roles given directly are all
        return tuple(sorted(principal.roles))
    names = dict.fromkeys(r for r in sorted(principal.roles) if r in policy.roles)
    index = policy.bindings_by_key
    candidates = set(policy.unindexed_bindings)
    for scope in principal.scopes:
        candidates.update(index.get(("scope", scope), ()))
    if principal.client_id is not None:
        candidates.update(index.get(("client_id", principal.client_id), ()))
    candidates.update(index.get(("subject", principal.subject), ()))
    for position in sorted(candidates):
        binding = policy.bindings[position]
        if holds(binding.when, principal):
            names.update(dict.fromkeys(binding.roles))
    return tuple(names)


def authentication_level(principal: Principal, policy: Policy) -> int:
    """How strong the login was: the highest level of any rule that holds, else the default."""
    levels = [LEVEL[rule.level] for rule in policy.auth_rules if holds(rule.when, principal)]
    level = max(levels) if levels else policy.auth_default
    ceiling = LEVEL.get(principal.max_level or "")
    return level if ceiling is None else min(level, ceiling)


def decide(principal: Principal, operation: Operation, policy: Policy, hinted_level: int = 0, *,
           era: str = "", upstream: str = "") -> Decision:
    """Allow or refuse one classified operation for one principal. `hinted_level` is the level a tool's own
    annotations ask for (`annotation_level`): it applies only to a tool no pattern of the policy names, and
    only ever raises the level (a server is not trusted to relax the policy). `era` (legacy | modern) and
    `upstream` (its name) say where the request came ("": not known); a YAML policy's rules for one upstream
    are its view `Policy.for_upstream`, a Cedar policy reads both from its context.

    Under `mode: audit_only` a refusal comes back allowed, with the refusal in `would_deny`: a policy rolled
    out in shadow is recorded, never enforced. A `firm` refusal (a URI the gateway cannot read safely, a method
    it does not know) is refused in either mode: that is no rule of the policy but the gateway's own reading.
    A tool call let through in shadow still needs the approval its rules ask for: approvals are not shadowed."""
    if policy.engine is not None:
        decision = policy.engine.decide(principal, operation, hinted_level, era, upstream)
    else:
        decision = _decide_rules(principal, operation, policy, hinted_level)
    if decision.allowed or policy.mode == "enforce" or decision.firm:
        return decision
    approval = policy.tools.approval(operation.name or "") if operation.method == "tools/call" else None
    return shadowed(replace(decision, reason="mode:audit_only", approval=approval), decision)


def refused_in_mode(policy: Policy, allowed: Decision, refusal: Decision) -> Decision:
    """`refusal` of what `allowed` let through, found after the decision (a count used up): refused, or under the
    policy's `mode: audit_only` let through as would_deny."""
    return shadowed(allowed, refusal) if policy.mode == "audit_only" and not refusal.firm else refusal


def shadowed(allowed: Decision, refusal: Decision) -> Decision:
    """`allowed` (a decision, taken without the rules in shadow) let through, recording that `refusal` would have
    refused it."""
    return replace(allowed, allowed=True, outcome="allowed", hidden=False, required_level=None, acr_values=(),
                   scopes=(), would_deny=refusal.reason, detail=refusal.detail)


def _decide_rules(principal: Principal, operation: Operation, policy: Policy, hinted_level: int) -> Decision:
    roles = roles_for(principal, policy)
    held = [policy.roles[name] for name in roles]
    kind = operation.kind

    def result(allowed: bool, reason: str, **extra: object) -> Decision:
        outcome = "allowed" if allowed else extra.pop("outcome", "denied")
        return Decision(allowed, reason, roles, policy.version, outcome, **extra)  # type: ignore[arg-type]

    if kind in PROTOCOL_KINDS:
        return result(True, f"protocol:{kind}")
    if kind == "unknown":
        return result(policy.unknown_methods == "allow", f"unknown_methods:{policy.unknown_methods}", firm=True)
    if not held:
        return result(False, "no-role", hidden=kind in ("tool_call", "prompt_get", "resource_read"))
    for answered in operation.input_responses:
        grants = _CLIENT_FEATURE.get(answered)
        if grants is None or not any(grants(role) for role in held):
            return result(False, f"input_response:{answered}", firm=grants is None)
    if kind in _ANY_ROLE:
        return result(True, f"role:{roles[0]}:{kind}")
    if kind == "sampling":
        return _decide_sampling(held, operation.max_tokens, result)
    if kind in _CLIENT_FEATURE:
        grants = _CLIENT_FEATURE[kind]
        granting = next((role for role in held if grants(role)), None)
        return result(granting is not None, f"role:{granting.name}:{kind}" if granting else f"no-grant:{kind}")
    if kind == "list":
        if operation.method in ("resources/list", "resources/templates/list"):
            granting = next((role for role in held if role.can_list_resources), None)
            return result(granting is not None,
                          f"role:{granting.name}:list_resources" if granting else "no-grant:list_resources")
        return result(True, f"role:{roles[0]}:list")
    if kind in ("tool_call", "prompt_get") or (kind == "completion" and operation.name is not None):
        is_tool = kind == "tool_call"
        what = "tool" if is_tool else "prompt"
        # Arguments are checked on a call; a list item stands for calling the tool with *some* arguments.
        calling = is_tool and operation.method == "tools/call"
        return _decide_target(principal, policy, held, result, operation.name or "", what,
                              (lambda r: r.tools) if is_tool else (lambda r: r.prompts),
                              policy.tools if is_tool else policy.prompts,
                              arguments=operation.arguments if calling else _NOT_CALLING,
                              hinted_level=hinted_level if is_tool else 0)
    if operation.uri is not None and kind in ("resource_read", "resource_subscribe", "resource_unsubscribe",
                                              "completion"):
        raw = template_probe(operation.uri) if kind == "completion" else operation.uri
        try:
            uri = normalize_uri(raw)
        except InvalidUri as exc:
            return result(False, f"uri:{exc}", hidden=True, firm=True)
        decision = _decide_target(principal, policy, held, result, uri, "resource", lambda r: r.resources,
                                  policy.resources)
        return _with_uri(decision, uri)
    if kind == "completion":
        return result(True, f"role:{roles[0]}:completion")
    return result(False, f"unhandled:{kind}", firm=True)


# Every field of an operation is part of the cache key but those `decide` does not read: a field added to
# `Operation` later is in the key unless it is named here. `arguments` are read only for a tool with argument
# constraints, whose decisions are never remembered.
_NOT_READ_BY_DECIDE = frozenset({"request_id", "arguments"})
_decided_fields = attrgetter(*(f.name for f in fields(Operation) if f.name not in _NOT_READ_BY_DECIDE))


class DecisionCache:
    """`decide()` remembered: the request path asks the same question (this principal, this operation, this
    policy) on every call a client makes, and a list filter asks it once per item.

    `decide` is pure, so its answer depends only on what the key holds: the principal and the policy objects
    (by identity: verified principals are cached per token, and a reload makes a new policy) and every field
    of the operation `decide` reads. Bounded: when full it starts again empty.
    """

    def __init__(self, size: int = 50_000) -> None:
        self._size = size
        self._answers: dict[tuple[Any, ...], tuple[Principal, Policy, Decision]] = {}

    def __call__(self, principal: Principal, operation: Operation, policy: Policy, hinted_level: int = 0, *,
                 era: str = "", upstream: str = "") -> Decision:
        if operation.arguments is not None and operation.kind == "tool_call" \
                and policy.constrained_tools.matches(operation.name or ""):
            # its answer depends on the arguments: not remembered
            return decide(principal, operation, policy, hinted_level, era=era, upstream=upstream)
        key = (id(principal), id(policy), hinted_level, era, upstream, _decided_fields(operation))
        found = self._answers.get(key)
        if found is not None and found[0] is principal and found[1] is policy:
            return found[2]
        decision = decide(principal, operation, policy, hinted_level, era=era, upstream=upstream)
        if len(self._answers) >= self._size:
            self._answers.clear()
        self._answers[key] = (principal, policy, decision)
        return decision


def annotation_level(annotations: object) -> int:
    """The level a tool's annotations ask for: `destructiveHint: true` high, `openWorldHint: true` standard (only
    when said outright: an annotation left out asks for nothing), else none (0)."""
    if not isinstance(annotations, Mapping):
        return 0
    if annotations.get("destructiveHint") is True:
        return LEVEL["high"]
    return LEVEL["standard"] if annotations.get("openWorldHint") is True else 0


def _decide_sampling(held: list[Role], max_tokens: int | None, result: Callable[..., Decision]) -> Decision:
    """A server asks this caller's model: a role must grant sampling, with a `max_tokens` cap (if it sets one)
    the request keeps to. Of the roles that allow it, the one with the most generous hourly count decides."""
    granting = [role for role in held if role.can_request_sampling]
    if not granting:
        return result(False, "no-grant:sampling")
    fitting = [role for role in granting if role.sampling is None or role.sampling.max_tokens is None
               or (max_tokens is not None and max_tokens <= role.sampling.max_tokens)]
    if not fitting:
        cap = max(role.sampling.max_tokens or 0 for role in granting if role.sampling is not None)
        asked = "no readable maxTokens" if max_tokens is None else f"maxTokens {max_tokens}"
        return result(False, f"sampling:max_tokens>{cap}", detail=f"the server asked for {asked}; the most a role "
                      f"of this caller allows is {cap}")
    best = max(fitting, key=lambda role: _NO_LIMIT if role.sampling is None or role.sampling.per_hour is None
               else role.sampling.per_hour)
    per_hour = None if best.sampling is None else best.sampling.per_hour
    return result(True, f"role:{best.name}:sampling", per_hour=per_hour)


_NO_LIMIT = 1 << 62


def _with_uri(decision: Decision, uri: str) -> Decision:
    return replace(decision, uri=uri)


_NOT_CALLING: Mapping[str, Any] = {}  # `arguments` of a decision on an item that is not being called


def _decide_target(
    principal: Principal,
    policy: Policy,
    held: list[Role],
    result: Callable[..., Decision],
    value: str,
    what: str,
    index_of: Callable[[Role], GlobIndex],
    requirements: Requirements,
    arguments: Mapping[str, Any] | None = _NOT_CALLING,
    hinted_level: int = 0,
    rules: Literal["split", "enforced", "all"] = "split",
) -> Decision:
    """`rules`: which of the item's rules apply: `enforced` or `all`; `split` (as asked): all of them unless some
    are in mode audit_only, and then the decision without those, with what they would change recorded."""
    if rules == "split" and requirements.shadowing and requirements.shadowed(value):
        # rules of this item in `mode: audit_only`: decided without them; what they would change is recorded
        enforced = _decide_target(principal, policy, held, result, value, what, index_of, requirements, arguments,
                                  hinted_level, rules="enforced")
        if not enforced.allowed:
            return enforced
        full = _decide_target(principal, policy, held, result, value, what, index_of, requirements, arguments,
                              hinted_level, rules="all")
        return full if full.allowed else shadowed(enforced, full)
    enforced_only = rules == "enforced"
    _, capabilities = requirements.of(value, enforced_only)
    level = requirements.required_level(value, hinted_level, enforced_only)
    granting = [role for role in held if index_of(role).matches(value)]
    if arguments is not _NOT_CALLING and granting and policy.constrained_tools.matches(value):
        violation = requirements.argument_violation(value, arguments, enforced_only)
        if violation is None:  # a role grants the call only through a grant whose constraints hold
            violations = [role.tool_violation(value, arguments) for role in granting]
            if all(v is not None for v in violations):
                violation = violations[0]
            granting = [role for role, v in zip(granting, violations, strict=True) if v is None]
        if violation is not None:
            return result(False, f"argument:{violation.argument}:{violation.rule}", detail=violation.why)
    sufficient = [role for role in granting if capabilities <= role.capabilities and role.level >= level]
    if not sufficient:
        if not granting:
            reason = f"no-grant:{what}"
        elif not any(capabilities <= role.capabilities for role in granting):
            missing = capabilities - frozenset().union(*(role.capabilities for role in granting))
            reason = f"capability:{','.join(sorted(missing))}"
        else:
            reason = f"level:role<{LEVELS[level]}"
        scopes = _scopes_that_would_grant(principal, policy, value, index_of, capabilities, level)
        if scopes:
            return result(False, reason, outcome="insufficient_scope", hidden=True, scopes=scopes)
        return result(False, reason, hidden=True)
    if authentication_level(principal, policy) < level:
        return result(False, f"level:authentication<{LEVELS[level]}", outcome="step_up",
                      required_level=LEVELS[level], acr_values=_acr_values(policy, level))
    return result(True, f"role:{sufficient[0].name}:{what}",
                  approval=requirements.approval(value) if what == "tool" else None)


def _scopes_that_would_grant(
    principal: Principal,
    policy: Policy,
    value: str,
    index_of: Callable[[Role], GlobIndex],
    capabilities: frozenset[str],
    level: int,
) -> tuple[str, ...]:
    """The scope to ask for: the first binding (in policy order) with a scope the principal lacks, whose other
    tests hold, giving a role that grants everything. One scope, because `scope=` in a challenge names what is
    required (RFC 6750 3), not alternatives. Costs one check per role, however many bindings there are."""
    first: int | None = None
    for name, role in policy.roles.items():
        positions = policy.scope_bindings.get(name)
        if not positions or (first is not None and positions[0] >= first):
            continue
        if not (index_of(role).matches(value) and capabilities <= role.capabilities and role.level >= level):
            continue
        for position in positions:
            if first is not None and position >= first:
                break
            when = policy.bindings[position].when
            if when.scope not in principal.scopes and holds(when, principal, ignore_scope=True):
                first = position
                break
    if first is None:
        return ()
    scope = policy.bindings[first].when.scope
    return (scope,) if scope is not None else ()


def _acr_values(policy: Policy, level: int) -> tuple[str, ...]:
    """The `acr` values that authentication-level rules say reach `level`, for the step-up challenge."""
    return tuple(dict.fromkeys(rule.when.acr for rule in policy.auth_rules
                               if rule.when.acr is not None and LEVEL[rule.level] >= level))
