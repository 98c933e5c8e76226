"""The policy file, parsed and compiled: roles, bindings, per-item requirements, authentication levels.

Owns the YAML schema of a policy file (`load_policy`, every problem as
`FILE: key.path: why`) and its compilation into `Policy`: roles with their
inherited permissions merged, every glob in a `GlobIndex`, bindings indexed
by what they test, all built once per load so that `decide()` parses nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from gateway.policy.constraints import ArgumentConstraint, Constraints, Violation, compile_constraints
from gateway.policy.globs import GlobIndex
from gateway.yamlfile import ProblemsError, StrictModel, YamlFileError, format_validation, read_yaml

LevelName = Literal["low", "standard", "high", "critical"]
LEVELS: tuple[LevelName, ...] = ("low", "standard", "high", "critical")
LEVEL: Mapping[str, int] = {name: rank for rank, name in enumerate(LEVELS)}

CAPABILITIES = frozenset({
    "filesystem:read", "filesystem:write", "filesystem:execute",
    "network:connect", "network:listen",
    "process:create", "process:terminate",
    "system:configure", "system:monitor",
})


class PolicyError(ProblemsError):
    """The policy file is invalid. `problems` holds one `FILE: key.path: why` line each."""


def _known_capabilities(values: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(values) - CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capability {', '.join(unknown)} (known: {', '.join(sorted(CAPABILITIES))})")
    return values


class ToolGrant(StrictModel):
    """`can_execute_tools: [{name: read_file, arguments: {path: {kind: path, within: [...]}}}]`: the tools
    matching `name`, only with arguments for which every constraint holds."""

    name: str
    arguments: dict[str, ArgumentConstraint] = Field(min_length=1)


class PermissionSpec(StrictModel):
    """The PermissionSet of a role. Unset keys are inherited; set ones replace the parent's."""

    can_list_resources: bool | None = None
    can_read_resources: tuple[str, ...] | None = None
    can_execute_tools: tuple[str | ToolGrant, ...] | None = None
    can_access_prompts: tuple[str, ...] | None = None
    can_request_sampling: bool | None = None
    can_elicit: bool | None = None
    can_list_roots: bool | None = None


class RoleSpec(StrictModel):
    inherits: tuple[str, ...] = ()
    security_level: LevelName | None = None
    capabilities: tuple[str, ...] = ()
    permissions: PermissionSpec = PermissionSpec()

    @field_validator("capabilities")
    @classmethod
    def _capabilities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _known_capabilities(value)


class ApprovalSpec(StrictModel):
    """`tools: {NAME: {approval: ...}}`: a person must approve each call before it is forwarded.

    `approvers` are `role:NAME` (a role the approver holds, from bindings or runtime assignments) or
    `subject:NAME`. `hold`: the call waits up to `timeout_s` for the decision. `retry`: the call is refused at
    once with the approval's id; once approved, the same call passes once before `timeout_s` has run out.
    """

    approvers: tuple[str, ...] = Field(min_length=1)
    timeout_s: float = Field(600, gt=0, le=7 * 86400)
    mode: Literal["hold", "retry"] = "hold"
    allow_self_approval: bool = False

    @field_validator("approvers")
    @classmethod
    def _approver_form(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in value if not (a.startswith(("role:", "subject:")) and a.partition(":")[2])]
        if bad:
            raise ValueError(f"{', '.join(bad)}: an approver is role:NAME or subject:NAME")
        return value


class Requirement(StrictModel):
    """What an item (tool, resource, prompt) demands beyond the permission to use it."""

    security_level: LevelName = "low"
    capabilities: tuple[str, ...] = ()
    approval: ApprovalSpec | None = None  # tools only
    arguments: dict[str, ArgumentConstraint] = Field(default_factory=dict)  # tools only: for every role

    @field_validator("capabilities")
    @classmethod
    def _capabilities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _known_capabilities(value)


class Condition(StrictModel):
    """A test on the principal; every key given must hold."""

    scope: str | None = None
    claim: dict[str, str | int | bool] | None = None
    client_id: str | None = None
    subject: str | None = None
    amr: str | None = None
    acr: str | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if not self.model_dump(exclude_none=True):
            raise ValueError("a condition needs at least one of scope, claim, client_id, subject, amr, acr")
        return self


class BindingSpec(StrictModel):
    when: Condition
    roles: tuple[str, ...] = Field(min_length=1)


class AuthLevelRule(StrictModel):
    when: Condition
    level: LevelName


class AuthLevels(StrictModel):
    rules: tuple[AuthLevelRule, ...] = ()
    default: LevelName = "standard"


class PolicySpec(StrictModel):
    roles: dict[str, RoleSpec] = Field(min_length=1)
    bindings: tuple[BindingSpec, ...] = ()
    tools: dict[str, Requirement] = Field(default_factory=dict)
    resources: dict[str, Requirement] = Field(default_factory=dict)
    prompts: dict[str, Requirement] = Field(default_factory=dict)
    authentication_levels: AuthLevels = AuthLevels()
    unknown_methods: Literal["deny", "allow"] = "deny"
    deny_detail: Literal["minimal", "explain"] = "minimal"

    @model_validator(mode="after")
    def _references(self) -> PolicySpec:
        for name, role in self.roles.items():
            for parent in role.inherits:
                if parent not in self.roles:
                    raise ValueError(f"role {name!r} inherits unknown role {parent!r}")
        for index, binding in enumerate(self.bindings):
            for role_name in binding.roles:
                if role_name not in self.roles:
                    raise ValueError(f"bindings[{index}] names unknown role {role_name!r}")
        for kind, items in (("resources", self.resources), ("prompts", self.prompts)):
            for name, requirement in items.items():
                if requirement.approval is not None:
                    raise ValueError(f"{kind}.{name}.approval: approvals are for tools only")
                if requirement.arguments:
                    raise ValueError(f"{kind}.{name}.arguments: argument constraints are for tools only")
        for name, requirement in self.tools.items():
            for approver in requirement.approval.approvers if requirement.approval else ():
                kind, _, value = approver.partition(":")
                if kind == "role" and value not in self.roles:
                    raise ValueError(f"tools.{name}.approval.approvers names unknown role {value!r}")
        return self


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

    def argument_violation(self, value: str, arguments: Mapping[str, Any] | None) -> Violation | None:
        """The first constraint of a pattern matching `value` that `arguments` break, or None."""
        if not self.constrained:
            return None
        for rule_id in sorted(self.index.matching(value)):
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

    def of(self, value: str) -> tuple[int, frozenset[str]]:
        if not self.index:
            return 0, _NONE
        level, capabilities = 0, set[str]()
        for rule_id in self.index.matching(value):
            rule = self.rules[rule_id]
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

    @property
    def scopes(self) -> tuple[str, ...]:
        """Every scope a binding tests, in policy order (what `scopes_supported` can advertise)."""
        return tuple(dict.fromkeys(b.when.scope for b in self.bindings if b.when.scope is not None))


def _merge(name: str, specs: Mapping[str, RoleSpec], trail: tuple[str, ...] = ()) -> dict[str, Any]:
    """A role's effective settings over those it inherits; inheritance cycles are an error."""
    if name in trail:
        raise ValueError(f"roles inherit in a cycle: {' -> '.join((*trail, name))}")
    spec = specs[name]
    merged: dict[str, Any] = {"level": None, "capabilities": set(), "permissions": {}}
    for parent in spec.inherits:
        inherited = _merge(parent, specs, (*trail, name))
        if inherited["level"] is not None:
            merged["level"] = max(merged["level"] or 0, inherited["level"])
        merged["capabilities"] |= inherited["capabilities"]
        for key, value in inherited["permissions"].items():
            current = merged["permissions"].get(key)
            if isinstance(value, tuple):
                merged["permissions"][key] = tuple({_grant_key(v): v for v in (*(current or ()), *value)}.values())
            else:
                merged["permissions"][key] = bool(current) or value
    if spec.security_level is not None:
        merged["level"] = LEVEL[spec.security_level]
    merged["capabilities"] |= set(spec.capabilities)
    merged["permissions"].update({k: v for k in PermissionSpec.model_fields
                                  if (v := getattr(spec.permissions, k)) is not None})
    return merged


def _grant_key(grant: str | ToolGrant) -> str:
    """What makes two grants the same one (a grant with constraints is a model, not hashable as it is)."""
    return grant if isinstance(grant, str) else grant.model_dump_json()


def _requirements(rules: Mapping[str, Requirement]) -> Requirements:
    return Requirements(GlobIndex(list(rules)), tuple(rules.values()),
                        tuple(compile_constraints(r.arguments) if r.arguments else None for r in rules.values()),
                        constrained=any(r.arguments for r in rules.values()),
                        approving=any(r.approval is not None for r in rules.values()))


def compile_policy(spec: PolicySpec, *, version: str, source: str) -> Policy:
    roles: dict[str, Role] = {}
    for name in spec.roles:
        merged = _merge(name, spec.roles)
        perms = merged["permissions"]
        roles[name] = Role(
            name=name,
            level=merged["level"] if merged["level"] is not None else LEVEL["standard"],
            capabilities=frozenset(merged["capabilities"]),
            can_list_resources=bool(perms.get("can_list_resources")),
            can_request_sampling=bool(perms.get("can_request_sampling")),
            can_elicit=bool(perms.get("can_elicit")),
            can_list_roots=bool(perms.get("can_list_roots")),
            tools=GlobIndex([g if isinstance(g, str) else g.name for g in perms.get("can_execute_tools", ())]),
            tool_grants=tuple(None if isinstance(g, str) else compile_constraints(g.arguments)
                              for g in perms.get("can_execute_tools", ())),
            resources=GlobIndex(perms.get("can_read_resources", ())),
            prompts=GlobIndex(perms.get("can_access_prompts", ())),
        )
    bindings = tuple(Binding(b.when, b.roles) for b in spec.bindings)
    by_key: dict[tuple[str, str], list[int]] = {}
    unindexed: list[int] = []
    for index, binding in enumerate(bindings):
        when = binding.when
        key = (("scope", when.scope) if when.scope is not None else
               ("client_id", when.client_id) if when.client_id is not None else
               ("subject", when.subject) if when.subject is not None else None)
        if key is None:
            unindexed.append(index)
        else:
            by_key.setdefault(key, []).append(index)
    scope_bindings: dict[str, list[int]] = {}
    for index, binding in enumerate(bindings):
        if binding.when.scope is not None:
            for role_name in binding.roles:
                scope_bindings.setdefault(role_name, []).append(index)
    tool_requirements = _requirements(spec.tools)
    return Policy(
        roles=roles,
        bindings=bindings,
        bindings_by_key={k: tuple(v) for k, v in by_key.items()},
        unindexed_bindings=tuple(unindexed),
        scope_bindings={k: tuple(v) for k, v in scope_bindings.items()},
        tools=tool_requirements,
        resources=_requirements(spec.resources),
        prompts=_requirements(spec.prompts),
        auth_rules=spec.authentication_levels.rules,
        auth_default=LEVEL[spec.authentication_levels.default],
        unknown_methods=spec.unknown_methods,
        deny_detail=spec.deny_detail,
        version=version,
        source=source,
        named_tools=frozenset().union(tool_requirements.index.exact, *(role.tools.exact for role in roles.values())),
        constrained_tools=GlobIndex(list(dict.fromkeys(pattern for pattern, _, _ in _argument_specs(spec)))),
        argument_specs=_argument_specs(spec),
    )


def _argument_specs(spec: PolicySpec) -> tuple[tuple[str, str, Mapping[str, ArgumentConstraint]], ...]:
    """Every set of argument constraints: its tool pattern, where the file says it, the constraints."""
    found = [(name, f"tools.{name}.arguments", rule.arguments) for name, rule in spec.tools.items() if rule.arguments]
    for role_name, role in spec.roles.items():
        for position, grant in enumerate(role.permissions.can_execute_tools or ()):
            if not isinstance(grant, str):
                found.append((grant.name, f"roles.{role_name}.permissions.can_execute_tools.{position}.arguments",
                              grant.arguments))
    return tuple(found)


def parse_policy(raw: Any, data: bytes, path: Path) -> Policy:
    """Validate and compile an already-read policy document."""
    if not isinstance(raw, dict):
        raise PolicyError([f"{path}: (top level): must be a mapping with a roles: key"])
    try:
        spec = PolicySpec.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(format_validation(str(path), exc)) from None
    try:
        return compile_policy(spec, version=hashlib.sha256(data).hexdigest()[:12], source=str(path))
    except ValueError as exc:
        raise PolicyError([f"{path}: roles: {exc}"]) from None


def load_policy(path: Path) -> Policy:
    """Read, validate and compile a policy file; raise PolicyError listing every problem."""
    try:
        raw, data = read_yaml(path)
    except YamlFileError as exc:
        raise PolicyError(exc.problems) from None
    return parse_policy(raw, data, path)
