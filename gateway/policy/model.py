"""Loading and compiling a policy file.

Owns `load_policy` (every problem as `FILE: key.path: why`; the schema is
`gateway.policy.spec`, a `.cedar` file goes to `gateway.policy.cedar`) and the
compilation of a validated spec into `Policy` (`gateway.policy.compiled`):
roles with their inherited permissions merged, every glob in a `GlobIndex`,
bindings indexed by what they test, a view per upstream its `upstreams:`
section names, all built once per load so that `decide()` parses nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.policy.compiled import Binding, Policy, PolicyEngine, Requirements, Role
from gateway.policy.constraints import ArgumentConstraint, compile_constraints
from gateway.policy.globs import GlobIndex
from gateway.policy.spec import (
    CAPABILITIES,
    LEVEL,
    LEVELS,
    ApprovalSpec,
    AuthLevelRule,
    AuthLevels,
    BindingSpec,
    Condition,
    LevelName,
    PermissionSpec,
    PolicyError,
    PolicySpec,
    Requirement,
    RoleSpec,
    SamplingSpec,
    ToolGrant,
    UpstreamGrants,
)
from gateway.yamlfile import YamlFileError, format_validation, read_yaml

__all__ = [  # the schema's and the compiled forms' names, still importable from here
    "CAPABILITIES",
    "LEVEL",
    "LEVELS",
    "ApprovalSpec",
    "AuthLevelRule",
    "AuthLevels",
    "Binding",
    "BindingSpec",
    "Condition",
    "LevelName",
    "PermissionSpec",
    "Policy",
    "PolicyEngine",
    "PolicyError",
    "PolicySpec",
    "Requirement",
    "Requirements",
    "Role",
    "RoleSpec",
    "SamplingSpec",
    "ToolGrant",
    "compile_policy",
    "load_policy",
    "parse_policy",
]

def _merge(name: str, specs: Mapping[str, RoleSpec], trail: tuple[str, ...] = ()) -> dict[str, Any]:
    """A role's effective settings over those it inherits; inheritance cycles are an error."""
    if name in trail:
        raise ValueError(f"roles inherit in a cycle: {' -> '.join((*trail, name))}")
    spec = specs[name]
    merged: dict[str, Any] = {"level": None, "capabilities": set(), "permissions": {}, "sampling": None}
    sampling: list[SamplingSpec | None] = []  # of each parent that grants sampling
    for parent in spec.inherits:
        inherited = _merge(parent, specs, (*trail, name))
        if inherited["level"] is not None:
            merged["level"] = max(merged["level"] or 0, inherited["level"])
        merged["capabilities"] |= inherited["capabilities"]
        if inherited["permissions"].get("can_request_sampling"):
            sampling.append(inherited["sampling"])
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
    merged["sampling"] = _own_over(spec.sampling, _most_generous(sampling))
    return merged


def _own_over(own: SamplingSpec | None, inherited: SamplingSpec | None) -> SamplingSpec | None:
    """A role's sampling limits: each it sets itself, else the inherited one (a limit set to null: none)."""
    if own is None or inherited is None:
        return own or inherited
    return SamplingSpec(**{name: getattr(own if name in own.model_fields_set else inherited, name)
                           for name in SamplingSpec.model_fields})


def _most_generous(limits: list[SamplingSpec | None]) -> SamplingSpec | None:
    """The sampling limits a role inherits from several parents that grant sampling: the most generous of each
    (as holding those roles side by side would give); a parent without a limit leaves none."""
    if not limits or None in limits:
        return None

    def most(values: list[int | None]) -> int | None:
        return None if None in values else max(v for v in values if v is not None)

    present = [limit for limit in limits if limit is not None]
    return SamplingSpec(max_tokens=most([limit.max_tokens for limit in present]),
                        per_hour=most([limit.per_hour for limit in present]))


def _grant_key(grant: str | ToolGrant) -> str:
    """What makes two grants the same one (a grant with constraints is a model, not hashable as it is)."""
    return grant if isinstance(grant, str) else grant.model_dump_json()


def _requirements(*rule_sets: Mapping[str, Requirement]) -> Requirements:
    """The rules of every set, in order (a pattern may come twice: once for every upstream, once for one)."""
    patterns = [pattern for rules in rule_sets for pattern in rules]
    rules = [rule for rule_set in rule_sets for rule in rule_set.values()]
    return Requirements(GlobIndex(patterns), tuple(rules),
                        tuple(compile_constraints(r.arguments) if r.arguments else None for r in rules),
                        constrained=any(r.arguments for r in rules),
                        approving=any(r.approval is not None for r in rules),
                        shadowing=any(r.mode == "audit_only" for r in rules))


def _upstream_grants(spec: PolicySpec, upstream: str | None, role: str) -> dict[str, tuple[Any, ...]]:
    """What `role` may use on `upstream` only: its own grants in `upstreams.NAME.roles`, and for each list the
    role does not set itself at the top level, those of the roles it inherits (as its top-level lists are)."""
    section = spec.upstreams.get(upstream) if upstream is not None else None
    if section is None:
        return {}

    def grants(name: str, key: str) -> list[Any]:
        own = section.roles.get(name)
        found = list(getattr(own, key)) if own is not None else []
        if getattr(spec.roles[name].permissions, key) is None:  # the role inherits this list
            for parent in spec.roles[name].inherits:
                found.extend(grants(parent, key))
        return found

    return {key: tuple({_grant_key(g): g for g in found}.values())
            for key in UpstreamGrants.model_fields if (found := grants(role, key))}


def compile_policy(spec: PolicySpec, *, version: str, source: str) -> Policy:
    """The policy for every upstream, with a view per upstream its `upstreams:` section names."""
    views = {name: _compile(spec, version=version, source=source, upstream=name) for name in spec.upstreams}
    return replace(_compile(spec, version=version, source=source), upstream_views=views)


def _compile(spec: PolicySpec, *, version: str, source: str, upstream: str | None = None) -> Policy:
    section = spec.upstreams.get(upstream) if upstream is not None else None
    roles: dict[str, Role] = {}
    for name in spec.roles:
        merged = _merge(name, spec.roles)
        perms = dict(merged["permissions"])
        for permission, extra in _upstream_grants(spec, upstream, name).items():
            perms[permission] = (*perms.get(permission, ()), *extra)
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
            sampling=merged["sampling"],
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
    tool_requirements = _requirements(spec.tools, *((section.tools,) if section else ()))
    argument_specs = _argument_specs(spec, upstream)
    return Policy(
        roles=roles,
        bindings=bindings,
        bindings_by_key={k: tuple(v) for k, v in by_key.items()},
        unindexed_bindings=tuple(unindexed),
        scope_bindings={k: tuple(v) for k, v in scope_bindings.items()},
        tools=tool_requirements,
        resources=_requirements(spec.resources, *((section.resources,) if section else ())),
        prompts=_requirements(spec.prompts, *((section.prompts,) if section else ())),
        auth_rules=spec.authentication_levels.rules,
        auth_default=LEVEL[spec.authentication_levels.default],
        unknown_methods=spec.unknown_methods,
        deny_detail=spec.deny_detail,
        mode=spec.mode,
        version=version,
        source=source,
        named_tools=frozenset().union(tool_requirements.index.exact, *(role.tools.exact for role in roles.values())),
        constrained_tools=GlobIndex(list(dict.fromkeys(pattern for pattern, _, _ in argument_specs))),
        argument_specs=argument_specs,
        name_patterns=_name_patterns(spec),
    )


def _name_patterns(spec: PolicySpec) -> tuple[tuple[str, str, str, str | None], ...]:
    """Every tool and prompt pattern, where it is, and the upstream it holds on (None: every one)."""
    found: list[tuple[str, str, str, str | None]] = []
    sections: list[tuple[str, str | None, Mapping[str, Requirement], Mapping[str, Requirement]]] = [
        ("", None, spec.tools, spec.prompts),
        *((f"upstreams.{name}.", name, section.tools, section.prompts) for name, section in spec.upstreams.items())]
    for where, upstream, tools, prompts in sections:
        found.extend((kind, pattern, f"{where}{kind}s.{pattern}", upstream)
                     for kind, rules in (("tool", tools), ("prompt", prompts)) for pattern in rules)
    grants: list[tuple[str, str | None, str, Any]] = [
        (f"roles.{name}.permissions.", None, name, role.permissions) for name, role in spec.roles.items()]
    grants += [(f"upstreams.{upstream}.roles.{name}.", upstream, name, extra)
               for upstream, section in spec.upstreams.items() for name, extra in section.roles.items()]
    for where, upstream, _, permissions in grants:
        for position, grant in enumerate(permissions.can_execute_tools or ()):
            pattern = grant if isinstance(grant, str) else grant.name
            found.append(("tool", pattern, f"{where}can_execute_tools.{position}", upstream))
        for position, pattern in enumerate(permissions.can_access_prompts or ()):
            found.append(("prompt", pattern, f"{where}can_access_prompts.{position}", upstream))
    return tuple(found)


def _argument_specs(spec: PolicySpec, upstream: str | None = None
                    ) -> tuple[tuple[str, str, Mapping[str, ArgumentConstraint]], ...]:
    """Every set of argument constraints that holds on `upstream` (None: on every upstream): its tool pattern,
    where the file says it, the constraints."""
    found = [(name, f"tools.{name}.arguments", rule.arguments) for name, rule in spec.tools.items() if rule.arguments]
    for role_name, role in spec.roles.items():
        for position, grant in enumerate(role.permissions.can_execute_tools or ()):
            if not isinstance(grant, str):
                found.append((grant.name, f"roles.{role_name}.permissions.can_execute_tools.{position}.arguments",
                              grant.arguments))
    section = spec.upstreams.get(upstream) if upstream is not None else None
    if section is not None:
        where = f"upstreams.{upstream}"
        found.extend((name, f"{where}.tools.{name}.arguments", rule.arguments)
                     for name, rule in section.tools.items() if rule.arguments)
        for role_name, grants in section.roles.items():
            found.extend((grant.name, f"{where}.roles.{role_name}.can_execute_tools.{position}.arguments",
                          grant.arguments)
                         for position, grant in enumerate(grants.can_execute_tools) if not isinstance(grant, str))
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
    """Read, validate and compile a policy file; raise PolicyError listing every problem. A `.cedar` file is a
    Cedar policy (`gateway.policy.cedar`, with the settings a config file may give it left at their defaults)."""
    if path.suffix == ".cedar":
        from gateway.policy.cedar import load_cedar_policy  # cedarpy is loaded only for a Cedar policy

        return load_cedar_policy(path)
    try:
        raw, data = read_yaml(path)
    except YamlFileError as exc:
        raise PolicyError(exc.problems) from None
    return parse_policy(raw, data, path)
