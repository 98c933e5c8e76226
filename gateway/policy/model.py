"""The policy file, parsed and compiled: roles, their permission sets, and bindings.

Owns the YAML schema of a policy file and its compilation into `Policy`, whose
matchers are built once per load so that `decide()` does no parsing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.yamlfile import YamlFileError, format_validation, read_yaml


class PolicyError(Exception):
    """The policy file is invalid. `problems` holds one `FILE: key.path: why` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PermissionSpec(_Model):
    can_list_resources: bool | None = None
    can_read_resources: tuple[str, ...] | None = None
    can_execute_tools: tuple[str, ...] | None = None
    can_access_prompts: tuple[str, ...] | None = None
    can_request_sampling: bool | None = None


class RoleSpec(_Model):
    inherits: tuple[str, ...] = ()
    permissions: PermissionSpec = Field(default_factory=PermissionSpec)


class BindingWhen(_Model):
    scope: str | None = None
    claim: dict[str, str | int | bool] | None = None
    client_id: str | None = None
    subject: str | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> BindingWhen:
        if self.scope is None and not self.claim and self.client_id is None and self.subject is None:
            raise ValueError("a binding needs at least one of scope, claim, client_id, subject")
        return self


class BindingSpec(_Model):
    when: BindingWhen
    roles: tuple[str, ...] = Field(min_length=1)


class PolicySpec(_Model):
    roles: dict[str, RoleSpec] = Field(min_length=1)
    bindings: tuple[BindingSpec, ...] = ()
    unknown_methods: Literal["deny", "allow"] = "deny"
    deny_detail: Literal["minimal", "explain"] = "minimal"

    @model_validator(mode="after")
    def _roles_exist(self) -> PolicySpec:
        for name, role in self.roles.items():
            for parent in role.inherits:
                if parent not in self.roles:
                    raise ValueError(f"role {name!r} inherits unknown role {parent!r}")
        for index, binding in enumerate(self.bindings):
            for role_name in binding.roles:
                if role_name not in self.roles:
                    raise ValueError(f"bindings[{index}] names unknown role {role_name!r}")
        return self


def compile_glob(pattern: str) -> str:
    """Regex source for one glob: `**` crosses `/`, `*` stays within a segment, the rest is literal."""
    parts = re.split(r"(\*\*|\*)", pattern)
    out = []
    for part in parts:
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]*")
        else:
            out.append(re.escape(part))
    return "".join(out)


class Matcher:
    """A set of globs compiled into one anchored regex; an empty set matches nothing."""

    __slots__ = ("_regex", "patterns")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        self._regex = re.compile("|".join(f"(?:{compile_glob(p)})" for p in patterns), re.DOTALL) if patterns else None

    def matches(self, value: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Role:
    """A role with its inherited permissions already merged in."""

    name: str
    can_list_resources: bool
    can_request_sampling: bool
    tools: Matcher
    resources: Matcher
    prompts: Matcher


@dataclass(frozen=True, slots=True)
class Binding:
    scope: str | None
    claim: Mapping[str, str | int | bool] | None
    client_id: str | None
    subject: str | None
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled policy. `version` is a digest of the file, recorded with every decision."""

    roles: Mapping[str, Role]
    bindings: tuple[Binding, ...]
    unknown_methods: Literal["deny", "allow"]
    deny_detail: Literal["minimal", "explain"]
    version: str
    source: str


def _merge_role(name: str, specs: Mapping[str, RoleSpec], trail: tuple[str, ...] = ()) -> PermissionSpec:
    """Permissions of `name` over those it inherits (its own values win); cycles are an error."""
    if name in trail:
        raise ValueError(f"roles inherit in a cycle: {' -> '.join((*trail, name))}")
    merged: dict[str, Any] = {}
    for parent in specs[name].inherits:
        parent_perms = _merge_role(parent, specs, (*trail, name))
        for key, value in parent_perms.model_dump(exclude_none=True).items():
            if isinstance(value, tuple) and key in merged:
                merged[key] = tuple(dict.fromkeys((*merged[key], *value)))
            elif isinstance(value, bool):
                merged[key] = merged.get(key, False) or value
            else:
                merged[key] = value
    for key, value in specs[name].permissions.model_dump(exclude_none=True).items():
        merged[key] = value
    return PermissionSpec(**merged)


def compile_policy(spec: PolicySpec, *, version: str, source: str) -> Policy:
    roles: dict[str, Role] = {}
    for name in spec.roles:
        perms = _merge_role(name, spec.roles)
        roles[name] = Role(
            name=name,
            can_list_resources=bool(perms.can_list_resources),
            can_request_sampling=bool(perms.can_request_sampling),
            tools=Matcher(perms.can_execute_tools or ()),
            resources=Matcher(perms.can_read_resources or ()),
            prompts=Matcher(perms.can_access_prompts or ()),
        )
    bindings = tuple(
        Binding(b.when.scope, b.when.claim, b.when.client_id, b.when.subject, b.roles) for b in spec.bindings
    )
    return Policy(roles, bindings, spec.unknown_methods, spec.deny_detail, version, source)


def load_policy(path: Path) -> Policy:
    """Read, validate and compile a policy file; raise PolicyError listing every problem."""
    try:
        raw, data = read_yaml(path)
    except YamlFileError as exc:
        raise PolicyError(exc.problems) from None
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
