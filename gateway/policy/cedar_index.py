"""Which policies of a Cedar policy could apply to one request, found without evaluating the others.

Owns the grouping of a Cedar file's policies, once per load, so that a decision evaluates only those whose
scope and conditions leave them a chance (Cedar itself evaluates every policy it is given):

    by action      the actions a policy's scope names (`action == ...`, `action in [...]`; none: every one)
    by resource    a policy whose scope names its resource (`resource == Gateway::Tool::"x"`) only for that one
    by prefix      a permit whose `when` demands, in a top-level `&&`, `resource.name like "get_*"`,
                   `resource.uri like "file:///data/*"`, `resource.name == "x"` or `resource.directory == "d/"`
                   only for a name or URI starting with that literal prefix; when an action has many of them

Only permits are grouped by prefix: a permit set aside is one that would not hold (false, or an error, which
Cedar counts as not holding), so the decision is the same. A forbid is always evaluated, so that one that
cannot be evaluated still refuses. Each group is a `cedarpy.PolicySet` built here, with Cedar's own policy ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import cedarpy

from gateway.policy.cedar_schema import ACTIONS, NAMESPACE
from gateway.policy.cedar_source import Rule

_KEY: Final = 24  # prefixes are looked up by at most this many characters (then checked whole)
_PREFIXED: Final = 32  # an action with fewer permits to index keeps them with the rest: one evaluation, not two
_CACHED: Final = 4096  # policy sets of candidate permits kept; when full, the cache starts again empty
_ATTRIBUTE: Final = {"name": "name", "uri": "uri", "directory": "uri"}  # a demand on it, as one on the name|uri


@dataclass(frozen=True, slots=True)
class Sets:
    """The policies of one group: all of them, and all but the soft forbids (`Rule.soft`)."""

    every: cedarpy.PolicySet
    firm: cedarpy.PolicySet | None  # None: there are no soft forbids among them (`every` serves)


class PolicyIndex:
    """The policies of a Cedar file grouped by what they could apply to (see above)."""

    def __init__(self, policies: Mapping[str, Mapping[str, Any]], rules: Mapping[str, Rule]) -> None:
        self._policies, self._rules = policies, rules
        self._demands: dict[str, str] = {}  # the prefix each permit grouped by one demands
        general: dict[str, dict[str, Any]] = {action: {} for action in ACTIONS}
        scoped: dict[tuple[str, str, str], dict[str, Any]] = {}
        prefixed: dict[str, dict[tuple[str, str], list[str]]] = {action: {} for action in ACTIONS}
        for pid, policy in policies.items():
            resource = policy["resource"]
            named = resource.get("entity") if resource.get("op") == "==" else None
            demand = None if rules[pid].forbid else _demanded_prefix(policy)
            for action in _actions_of(policy["action"]):
                if named is not None:
                    scoped.setdefault((action, named["type"], named["id"]), {})[pid] = policy
                elif demand is not None:
                    prefixed[action].setdefault(demand, []).append(pid)
                    self._demands[pid] = demand[1]
                else:
                    general[action][pid] = policy
        self._prefixed: dict[str, dict[tuple[str, str], tuple[str, ...]]] = {}
        for action, demands in prefixed.items():
            if sum(len(pids) for pids in demands.values()) < _PREFIXED:
                general[action].update((pid, policies[pid]) for pids in demands.values() for pid in pids)
            else:
                by_key: dict[tuple[str, str], list[str]] = {}
                for (attribute, prefix), pids in demands.items():
                    by_key.setdefault((attribute, prefix[:_KEY]), []).extend(pids)
                self._prefixed[action] = {key: tuple(pids) for key, pids in by_key.items()}
        self._general = {action: self._sets(group) for action, group in general.items() if group}
        self._scoped = {key: self._sets(group) for key, group in scoped.items()}
        self._candidates: dict[tuple[str, ...], cedarpy.PolicySet] = {}

    def sets(self, action: str, kind: str, key: str, *, firm_only: bool = False) -> Iterator[cedarpy.PolicySet]:
        """The policy sets to evaluate for `action` on the resource `Gateway::KIND::"KEY"` (`firm_only`: without
        the soft forbids)."""
        for group in (self._general.get(action), self._scoped.get((action, f"{NAMESPACE}::{kind}", key))):
            if group is not None:
                yield group.firm if firm_only and group.firm is not None else group.every
        demands = self._prefixed.get(action)
        if demands and kind != "Server":
            candidates = self._matching(demands, "uri" if kind == "Resource" else "name", key)
            if candidates:
                yield self._candidate_set(candidates)

    def _matching(self, demands: Mapping[tuple[str, str], tuple[str, ...]], attribute: str, value: str
                  ) -> tuple[str, ...]:
        found: list[str] = []
        for length in range(1, min(len(value), _KEY) + 1):
            found.extend(pid for pid in demands.get((attribute, value[:length]), ())
                         if value.startswith(self._demands[pid]))
        return tuple(sorted(found))

    def _candidate_set(self, candidates: tuple[str, ...]) -> cedarpy.PolicySet:
        found = self._candidates.get(candidates)
        if found is None:
            if len(self._candidates) >= _CACHED:
                self._candidates.clear()
            found = self._candidates[candidates] = policy_set({pid: self._policies[pid] for pid in candidates})
        return found

    def _sets(self, policies: Mapping[str, Any]) -> Sets:
        firm = {pid: p for pid, p in policies.items() if not self._rules[pid].soft}
        return Sets(policy_set(policies), policy_set(firm) if len(firm) < len(policies) else None)


def policy_set(policies: Mapping[str, Any]) -> cedarpy.PolicySet:
    """A policy set of policies in Cedar's JSON form, under the ids they have in the file."""
    return cedarpy.PolicySet.from_json_str(json.dumps({"staticPolicies": policies, "templates": {},
                                                       "templateLinks": []}))


def _actions_of(scope: Mapping[str, Any]) -> list[str]:
    """The actions a policy's action scope can match (the gateway's actions form no groups)."""
    if scope.get("op") == "All":
        return list(ACTIONS)
    named = [scope["entity"]] if "entity" in scope else scope.get("entities", [])
    return [entity["id"] for entity in named if entity["id"] in ACTIONS]


def _demanded_prefix(policy: Mapping[str, Any]) -> tuple[str, str] | None:
    """("name" | "uri", prefix): the longest literal prefix a `when` condition of `policy` demands, if any."""
    found: tuple[str, str] | None = None
    for condition in policy.get("conditions", ()):
        if condition.get("kind") != "when":
            continue
        for conjunct in _conjuncts(condition["body"]):
            demand = _prefix_of(conjunct)
            if demand is not None and (found is None or len(demand[1]) > len(found[1])):
                found = demand
    return found


def _conjuncts(expression: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    both = expression.get("&&")
    if isinstance(both, Mapping):
        yield from _conjuncts(both["left"])
        yield from _conjuncts(both["right"])
    else:
        yield expression


def _prefix_of(test: Mapping[str, Any]) -> tuple[str, str] | None:
    """The prefix `resource.ATTR like "P*..."` or `resource.ATTR == "P"` demands of the name or URI."""
    if "like" in test:
        attribute = _resource_attribute(test["like"]["left"])
        prefix = []
        for part in test["like"]["pattern"]:
            if not isinstance(part, Mapping):  # "Wildcard"
                break
            prefix.append(part["Literal"])
        text = "".join(prefix)
        return (attribute, text) if attribute in ("name", "uri") and text else None
    if "==" in test:
        left, right = test["=="]["left"], test["=="]["right"]
        attribute, value = _resource_attribute(left), right.get("Value")
        if attribute is None:
            attribute, value = _resource_attribute(right), left.get("Value")
        if attribute in _ATTRIBUTE and isinstance(value, str) and value:
            return (_ATTRIBUTE[attribute], value)
    return None


def _resource_attribute(expression: Mapping[str, Any]) -> str | None:
    access = expression.get(".")
    if isinstance(access, Mapping) and access.get("left") == {"Var": "resource"}:
        attribute = access.get("attr")
        return attribute if isinstance(attribute, str) else None
    return None
