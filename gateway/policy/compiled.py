"""A policy as `decide()` reads it: roles with their inheritance merged, bindings, per-item requirements.

Owns the compiled forms (`Policy`, `Role`, `Binding`, `Requirements`, and the
`PolicyEngine` a policy in another language decides with) and the lookups on
them. Built by `gateway.policy.model` once per load; nothing here parses.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from gateway.policy.constraints import ArgumentConstraint, Constraints, Violation
from gateway.policy.globs import GlobIndex
from gateway.policy.spec import LEVEL, ApprovalSpec, AuthLevelRule, Condition, Requirement, SamplingSpec

if TYPE_CHECKING:
    from gateway.mcp import Operation
    from gateway.policy.engine import Decision
    from gateway.principal import Principal


class PolicyEngine(abc.ABC):
    """A policy written in another language (Cedar: `gateway.policy.cedar`) decides in its own way; the
    `Policy` it sits in has no YAML rules, and `decide()` hands every operation to it."""

    language: ClassVar[str]  # as `policy.engine` names it in the config

    @abc.abstractmethod
    def decide(self, principal: Principal, operation: Operation, hinted_level: int, era: str, upstream: str
               ) -> Decision: ...


@dataclass(frozen=True, slots=True)
class Role:
    """A role with everything it inherits merged in."""

    name: str
    level: int
    capabilities: frozenset[str]
    can_list_resources: bool
    can_request_sampling: bool
    can_elicit: bool
    can_list_roots: bool
    tools: GlobIndex
    resources: GlobIndex
    prompts: GlobIndex
    tool_grants: tuple[Constraints | None, ...] = ()  # per pattern of `tools`: its argument constraints, if any
    sampling: SamplingSpec | None = None  # limits on the sampling requests this role lets a server make

    def tool_violation(self, name: str, arguments: Mapping[str, Any] | None) -> Violation | None:
        """None when a grant of this role matching `name` holds for `arguments` (one without constraints always
        does); else why the first matching grant does not. Only for a name `tools` matches."""
        first = None
        for grant in self.tools.matching(name):
            constraints = self.tool_grants[grant] if self.tool_grants else None
            violation = None if constraints is None else constraints.check(arguments)
            if violation is None:
                return None
            first = first or violation
        return first


@dataclass(frozen=True, slots=True)
class Binding:
    when: Condition
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Requirements:
    """Per-item requirements for one kind of item: every matching pattern applies (the strictest wins)."""

    index: GlobIndex
    rules: tuple[Requirement, ...]
    arguments: tuple[Constraints | None, ...]  # per rule: its compiled argument constraints (tools), if any
    # whether any rule has constraints / an approval: most policies have neither, and then neither costs a lookup
    constrained: bool = False
    approving: bool = False
    shadowing: bool = False  # whether any rule is in mode audit_only

    def shadowed(self, value: str) -> bool:
        """Whether a rule in mode audit_only applies to `value`."""
        return any(self.rules[rule_id].mode == "audit_only" for rule_id in self.index.matching(value))

    def argument_violation(self, value: str, arguments: Mapping[str, Any] | None,
                           enforced_only: bool = False) -> Violation | None:
        """The first constraint of a pattern matching `value` that `arguments` break, or None."""
        if not self.constrained:
            return None
        for rule_id in sorted(self.index.matching(value)):
            if enforced_only and self.rules[rule_id].mode == "audit_only":
                continue
            constraints = self.arguments[rule_id]
            violation = None if constraints is None else constraints.check(arguments)
            if violation is not None:
                return violation
        return None

    def approval(self, value: str) -> ApprovalSpec | None:
        """The approval a call of `value` needs: that of the first pattern (in policy order) that asks for one."""
        if not self.approving:
            return None
        asking = [rule_id for rule_id in self.index.matching(value) if self.rules[rule_id].approval is not None]
        return self.rules[min(asking)].approval if asking else None

    def required_level(self, value: str, hinted_level: int, enforced_only: bool = False) -> int:
        """The level `value` requires: its rules' (in mode enforce only, if so asked), or `hinted_level` (what a
        tool's annotations ask for) when none of those rules names it and the hint is higher."""
        level, _ = self.of(value, enforced_only)
        if hinted_level > level and not any(not enforced_only or self.rules[rule_id].mode != "audit_only"
                                            for rule_id in self.index.matching(value)):
            return hinted_level
        return level

    def of(self, value: str, enforced_only: bool = False) -> tuple[int, frozenset[str]]:
        """The level and capabilities `value` requires (by the rules in mode enforce only, if so asked)."""
        if not self.index:
            return 0, _NONE
        level, capabilities = 0, set[str]()
        for rule_id in self.index.matching(value):
            rule = self.rules[rule_id]
            if enforced_only and rule.mode == "audit_only":
                continue
            level = max(level, LEVEL[rule.security_level])
            capabilities.update(rule.capabilities)
        return level, frozenset(capabilities)


_NONE: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled policy. `version` is a digest of the file, recorded with every decision."""

    roles: Mapping[str, Role]
    bindings: tuple[Binding, ...]
    bindings_by_key: Mapping[tuple[str, str], tuple[int, ...]]  # ("scope", "mcp:tools") -> binding indices
    unindexed_bindings: tuple[int, ...]
    scope_bindings: Mapping[str, tuple[int, ...]]  # role -> bindings with a scope that give it, in policy order
    tools: Requirements
    resources: Requirements
    prompts: Requirements
    auth_rules: tuple[AuthLevelRule, ...]
    auth_default: int
    unknown_methods: Literal["deny", "allow"]
    deny_detail: Literal["minimal", "explain"]
    version: str
    source: str
    named_tools: frozenset[str]  # tool names the policy spells out: the only ones allowed as metric labels
    constrained_tools: GlobIndex  # tool patterns with argument constraints, on a tool or a grant
    # (pattern, where in the file, the constraints) of every set of argument constraints, for lint
    argument_specs: tuple[tuple[str, str, Mapping[str, ArgumentConstraint]], ...] = ()
    engine: PolicyEngine | None = None  # a policy in another language decides instead of the YAML rules
    mode: Literal["enforce", "audit_only"] = "enforce"  # audit_only: a refusal lets the call through, as would_deny
    upstream_views: Mapping[str, Policy] = field(default_factory=dict)  # the policy as it holds on one upstream
    # (tool|prompt, pattern, where in the file, its upstream or None: every one) of every name pattern, for lint
    name_patterns: tuple[tuple[str, str, str, str | None], ...] = ()

    def unknown_upstreams(self, names: Collection[str]) -> list[str]:
        """The upstreams the `upstreams:` section names that are not among `names`: rules that would hold
        nowhere (a typo there would leave the upstream it meant without them)."""
        return sorted(set(self.upstream_views) - set(names))

    def for_upstream(self, name: str) -> Policy:
        """The policy as it holds on upstream `name`: with that upstream's own rules, if it has any."""
        return self.upstream_views.get(name, self)

    @property
    def scopes(self) -> tuple[str, ...]:
        """Every scope a binding tests, in policy order (what `scopes_supported` can advertise)."""
        return tuple(dict.fromkeys(b.when.scope for b in self.bindings if b.when.scope is not None))
