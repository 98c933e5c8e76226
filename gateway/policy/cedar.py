"""Cedar as a second policy language: a `.cedar` file compiled into a `Policy` whose engine decides.

Owns `load_cedar_policy` (the file read and checked by `cedar_source`, compiled once) and `CedarEngine`,
which asks `cedarpy` about one classified operation (the model: `cedar_schema`) and words the answer as the
YAML engine words its own, so audit, explain, list filtering and refusals read the same:

    a permit holds, no forbid             allowed, reason the permit's @id (the first in the file)
    no permit holds                       denied "no-grant:tool|prompt|resource|list|...", hidden for a target
    a forbid holds                        denied, reason the forbid's @id
    only @step_up("LEVEL") forbids hold,  step_up to LEVEL (the highest asked): authenticating more strongly
      and without them a permit does        is what it takes
    only @mode("audit_only") forbids      allowed, would_deny the forbid's @id: a rule tried in the audit
      hold, and without them a permit       log before it is enforced
    a forbid cannot be evaluated          denied "cedar-error:ID": it fails closed (Cedar would skip it)

Protocol plumbing (initialize, ping, notifications, tasks, ...) is open to every caller without asking
Cedar, and a method the gateway does not know follows `unknown_methods`, as under a YAML policy.

Cost: the policies are grouped at load (`cedar_index`: by action, by the resource a scope names, by the prefix
a permit demands of a name or URI), so a decision evaluates only those that could apply. A principal's entity
is built once per principal object (they are cached per token). Only a refusal by an annotated forbid costs a
second evaluation, without those forbids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cedarpy

from gateway.mcp import PROTOCOL_KINDS, Operation
from gateway.policy.cedar_index import PolicyIndex
from gateway.policy.cedar_schema import ACTIONS, NAMESPACE
from gateway.policy.cedar_source import CedarSource, Rule, read_cedar
from gateway.policy.engine import Decision, shadowed
from gateway.policy.globs import GlobIndex
from gateway.policy.model import LEVEL, LEVELS, Policy, PolicyEngine, Requirements
from gateway.policy.uri import InvalidUri, normalize_uri, template_probe
from gateway.principal import Principal

_KIND_ACTIONS: Mapping[str, str] = {
    "tool_call": "tools/call", "prompt_get": "prompts/get", "resource_read": "resources/read",
    "resource_subscribe": "resources/subscribe", "resource_unsubscribe": "resources/unsubscribe",
    "logging_set_level": "logging/setLevel", "subscriptions_listen": "subscriptions/listen",
    "sampling": "sampling/createMessage", "elicitation": "elicitation/create", "roots_list": "roots/list",
}
_LISTING_RESOURCES = frozenset({"resources/list", "resources/templates/list"})
_TARGET_WORD = {"Tool": "tool", "Prompt": "prompt", "Resource": "resource"}
_SERVER = ("Server", "upstream")
_ERRORED = re.compile(r"policy `([^`]*)`")
_PRINCIPALS = 10_000  # principal entities kept; when full, the cache starts again empty
_DEPTH = 32  # how deep arguments are handed to Cedar
_LONG = range(-(2**63), 2**63)
_DROP = object()


def load_cedar_policy(
    path: Path,
    *,
    mode: Literal["enforce", "audit_only"] = "enforce",
    deny_detail: Literal["minimal", "explain"] = "minimal",
    unknown_methods: Literal["deny", "allow"] = "deny",
) -> Policy:
    """A Cedar policy file as a `Policy` (the settings a YAML policy file holds itself come from the config).
    PolicyError lists every problem as `FILE: line N: why`."""
    source = read_cedar(path)
    engine = CedarEngine(source, unknown_methods)
    none = Requirements(GlobIndex([]), (), ())
    return Policy(
        roles={}, bindings=(), bindings_by_key={}, unindexed_bindings=(), scope_bindings={},
        tools=none, resources=none, prompts=none, auth_rules=(), auth_default=LEVEL["standard"],
        unknown_methods=unknown_methods, deny_detail=deny_detail, version=source.version, source=str(path),
        named_tools=frozenset(),
        # a decision that reads the arguments is not one to remember per tool (`DecisionCache`)
        constrained_tools=GlobIndex(["**"] if any(r.reads_arguments for r in source.rules.values()) else []),
        engine=engine, mode=mode,
    )


@dataclass(frozen=True, slots=True)
class _Answer:
    permits: tuple[Rule, ...]  # that hold, in file order, when no forbid does
    forbids: tuple[Rule, ...]  # that hold, in file order
    error: str | None = None  # a forbid, or the request, that could not be evaluated: the refusal's reason
    detail: str = ""


class CedarEngine(PolicyEngine):
    """Decides for a `Policy` compiled from a Cedar file (`PolicyEngine`)."""

    language = "cedar"

    def __init__(self, source: CedarSource, unknown_methods: Literal["deny", "allow"]) -> None:
        self._version = source.version
        self._rules = source.rules
        self._unknown_methods = unknown_methods
        self._index = PolicyIndex(source.policies, source.rules)
        self._principals: dict[int, tuple[Principal, cedarpy.Entities]] = {}

    def decide(self, principal: Principal, operation: Operation, hinted_level: int, era: str = "",
               upstream: str = "") -> Decision:
        kind = operation.kind
        roles = tuple(sorted(principal.roles))

        def result(allowed: bool, reason: str, **extra: Any) -> Decision:
            extra.setdefault("outcome", "allowed" if allowed else "denied")
            return Decision(allowed, reason, roles, self._version, **extra)

        if kind in PROTOCOL_KINDS:
            return result(True, f"protocol:{kind}")
        if kind == "unknown":
            return result(self._unknown_methods == "allow", f"unknown_methods:{self._unknown_methods}", firm=True)
        for answered in operation.input_responses:  # decided as the server's request they answer would be
            action = _KIND_ACTIONS.get(answered) if answered in ("sampling", "elicitation", "roots_list") else None
            if action is None:
                return result(False, f"input_response:{answered}", firm=True)
            if not self.decide(principal, Operation(answered, action), 0, era, upstream).allowed:
                return result(False, f"input_response:{answered}")
        action = _action(operation)
        if action is None:
            return result(False, f"unhandled:{kind}", firm=True)
        try:
            resource = _resource(operation)
        except InvalidUri as exc:
            return result(False, f"uri:{exc}", hidden=True, firm=True)
        uri = resource[1] if resource[0] == "Resource" else None
        context: dict[str, Any] = {"hinted_level": hinted_level if action == "tools/call" else 0, "era": era,
                                   "upstream": upstream}
        if operation.method == "tools/call":  # a call: a tool in a list stands for calling it with *some* arguments
            context["arguments"] = _cedar_value(operation.arguments or {}, _DEPTH)
        answer = self._answer(principal, action, resource, context)
        what = _TARGET_WORD.get(resource[0]) or (
            ("list_resources" if operation.method in _LISTING_RESOURCES else "list") if kind == "list" else kind)
        hidden = resource[0] in _TARGET_WORD
        if answer.error is not None:  # a request Cedar cannot evaluate at all is no rule's refusal: firm
            return result(False, answer.error, detail=answer.detail, uri=uri, firm=answer.error == _REQUEST_ERROR)
        if answer.permits:
            return result(True, answer.permits[0].id, uri=uri)
        if not answer.forbids:
            return result(False, f"no-grant:{what}", hidden=hidden, uri=uri)
        firm = [rule for rule in answer.forbids if not rule.soft]
        if firm:
            return result(False, firm[0].id, hidden=hidden and not firm[0].reads_arguments,
                          detail=f"forbidden at line {firm[0].line}", uri=uri)
        without = self._answer(principal, action, resource, context, firm_only=True)
        if without.error is not None or not without.permits:
            return result(False, without.error or f"no-grant:{what}",
                          hidden=without.error is None and hidden, detail=without.detail, uri=uri)
        step_up = [rule for rule in answer.forbids if rule.step_up is not None and not rule.audit_only]
        if step_up:
            highest = max(step_up, key=lambda rule: rule.step_up or 0)
            return result(False, highest.id, outcome="step_up", required_level=LEVELS[highest.step_up or 0], uri=uri)
        shadow = answer.forbids[0]
        return shadowed(result(True, without.permits[0].id, uri=uri),
                        result(False, shadow.id, detail=f"forbidden at line {shadow.line}"))

    def _answer(self, principal: Principal, action: str, resource: tuple[str, str], context: dict[str, Any],
                *, firm_only: bool = False) -> _Answer:
        sets = list(self._index.sets(action, *resource, firm_only=firm_only))
        if not sets:
            return _Answer((), ())
        try:
            entities = self._principal_entities(principal)
            if resource[0] != "Server":
                entities = entities.with_added_json_str(json.dumps([_resource_entity(resource)]))
        except ValueError as exc:  # a name Cedar cannot hold (a lone surrogate in a token's sub): nothing to decide
            return _Answer((), (), _REQUEST_ERROR, str(exc))
        request = {"principal": {"type": f"{NAMESPACE}::User", "id": principal.subject},
                   "action": {"type": f"{NAMESPACE}::Action", "id": action},
                   "resource": {"type": f"{NAMESPACE}::{resource[0]}", "id": resource[1]}, "context": context}
        permits: list[Rule] = []
        forbids: list[Rule] = []
        for policy_set in sets:
            answer = cedarpy.is_authorized(request, policy_set, entities)
            if answer.decision is cedarpy.Decision.NoDecision:
                return _Answer((), (), _REQUEST_ERROR, "; ".join(answer.diagnostics.errors))
            for error in answer.diagnostics.errors:
                found = _ERRORED.search(error)
                rule = self._rules.get(found.group(1)) if found else None
                if rule is not None and rule.forbid and rule.audit_only:
                    forbids.append(rule)  # in shadow: what it would have done is recorded, nothing refused
                elif rule is not None and rule.forbid:
                    return _Answer((), (), f"cedar-error:{rule.id}", error)
            holding = [self._rules[pid] for pid in answer.diagnostics.reasons]
            (permits if answer.allowed else forbids).extend(holding)
        if forbids:
            return _Answer((), tuple(sorted(forbids, key=_in_file)))
        return _Answer(tuple(sorted(permits, key=_in_file)), ())

    def _principal_entities(self, principal: Principal) -> cedarpy.Entities:
        found = self._principals.get(id(principal))
        if found is not None and found[0] is principal:
            return found[1]
        entities = cedarpy.Entities.from_json_str(json.dumps([user_entity(principal)]))
        if len(self._principals) >= _PRINCIPALS:
            self._principals.clear()
        self._principals[id(principal)] = (principal, entities)
        return entities


_REQUEST_ERROR = "cedar-error:request"


def _in_file(rule: Rule) -> int:
    return rule.position


def _action(operation: Operation) -> str | None:
    kind, method = operation.kind, operation.method
    if kind == "list":
        return method if method in ACTIONS else None
    if kind == "completion":
        # completion/complete itself; or a template in a resources/templates/list, shown when an expansion of it
        # is readable
        return method if method == "completion/complete" else "resources/read"
    return _KIND_ACTIONS.get(kind)


def _resource(operation: Operation) -> tuple[str, str]:
    """(entity type, id) of what the operation acts on; InvalidUri for a URI refused outright."""
    kind = operation.kind
    if operation.name is not None and kind in ("tool_call", "prompt_get", "completion"):
        return ("Tool" if kind == "tool_call" else "Prompt", operation.name)
    if operation.uri is not None and kind in ("resource_read", "resource_subscribe", "resource_unsubscribe",
                                              "completion"):
        return ("Resource", normalize_uri(template_probe(operation.uri) if kind == "completion" else operation.uri))
    return _SERVER


def _resource_entity(resource: tuple[str, str]) -> dict[str, Any]:
    kind, key = resource
    # `directory`: `like "file:///srv/docs/*"` crosses `/`; `directory == "file:///srv/docs/"` is one level
    attrs = {"uri": key, "directory": key[:key.rfind("/") + 1]} if kind == "Resource" else {"name": key}
    return {"uid": {"type": f"{NAMESPACE}::{kind}", "id": key}, "attrs": attrs, "parents": []}


def user_entity(principal: Principal) -> dict[str, Any]:
    """The principal as a Cedar entity (JSON form); claims are tags, each a set of strings (`_claim_strings`)."""
    tags = {name: strings for name, value in principal.claims.items()
            if (strings := _claim_strings(value)) is not None}
    return {
        "uid": {"type": f"{NAMESPACE}::User", "id": principal.subject},
        "attrs": {
            "subject": principal.subject, "issuer": principal.issuer, "client_id": principal.client_id or "",
            "roles": sorted(principal.roles), "scopes": sorted(principal.scopes), "amr": sorted(principal.amr),
            "acr": principal.acr or "", "max_level": LEVEL.get(principal.max_level or "", LEVEL["critical"]),
        },
        "parents": [],
        "tags": tags,
    }


def _claim_strings(value: object) -> list[str] | None:
    """A claim as a set of strings: a string, number or boolean as its JSON text; a list, each of those in it.
    An object or a null has no such form and is left out."""
    if isinstance(value, list):
        return [text for item in value if (text := _claim_text(item)) is not None]
    text = _claim_text(value)
    return None if text is None else [text]


def _claim_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return json.dumps(value) if value == value and value not in (float("inf"), float("-inf")) else None
    return None


def _cedar_value(value: object, depth: int) -> Any:
    """Arguments as Cedar reads them: strings, booleans, 64-bit integers, sets, records. A value Cedar has no form
    for (a float, a null, a larger integer) is left out, and so is a member whose name starts with `__` (Cedar's
    JSON reads `__entity` and `__extn` as an entity or an extension value, not as data)."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if value in _LONG else _DROP
    if depth <= 0:
        return _DROP
    if isinstance(value, list):
        return [kept for item in value if (kept := _cedar_value(item, depth - 1)) is not _DROP]
    if isinstance(value, Mapping):
        return {key: kept for key, item in value.items()
                if isinstance(key, str) and not key.startswith("__")
                and (kept := _cedar_value(item, depth - 1)) is not _DROP}
    return _DROP
