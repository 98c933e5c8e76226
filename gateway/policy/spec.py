"""The schema of a policy file: every key, its type and the checks that need no other key's compilation.

Owns the pydantic models a policy document is validated against (`PolicySpec`
and its parts), the level and capability vocabularies, and `PolicyError`.
Compiling a validated spec into what `decide()` reads is `gateway.policy.model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from gateway.policy.constraints import ArgumentConstraint
from gateway.yamlfile import ProblemsError, StrictModel

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


class SamplingSpec(StrictModel):
    """`roles.NAME.sampling`: how much of this caller's model a server may use (with can_request_sampling)."""

    max_tokens: int | None = Field(None, gt=0, strict=True)  # the most `maxTokens` one sampling request may ask for
    per_hour: int | None = Field(None, gt=0, strict=True)  # passed on per principal in an hour (a fixed window)


class RoleSpec(StrictModel):
    inherits: tuple[str, ...] = ()
    security_level: LevelName | None = None
    capabilities: tuple[str, ...] = ()
    permissions: PermissionSpec = PermissionSpec()
    sampling: SamplingSpec | None = None  # unset: inherited; unset everywhere: no limit

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
    # audit_only: a call this rule alone would refuse goes through, recorded as would_deny (a rule in shadow)
    mode: Literal["enforce", "audit_only"] = "enforce"

    @field_validator("capabilities")
    @classmethod
    def _capabilities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _known_capabilities(value)

    @model_validator(mode="after")
    def _no_approval_in_shadow(self) -> Requirement:
        if self.mode == "audit_only" and self.approval is not None:
            raise ValueError("a rule in mode audit_only refuses nothing, so it cannot ask for an approval")
        return self


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


class UpstreamGrants(StrictModel):
    """`upstreams.NAME.roles.ROLE`: what the role may use on that upstream, on top of its grants everywhere."""

    can_execute_tools: tuple[str | ToolGrant, ...] = ()
    can_read_resources: tuple[str, ...] = ()
    can_access_prompts: tuple[str, ...] = ()


class UpstreamSpec(StrictModel):
    """`upstreams.NAME` (a name of the config's `upstreams:`): rules that hold on that upstream only, added to
    those at the top level, which hold on every upstream. A role's grants here are inherited like its others."""

    roles: dict[str, UpstreamGrants] = Field(default_factory=dict)
    tools: dict[str, Requirement] = Field(default_factory=dict)
    resources: dict[str, Requirement] = Field(default_factory=dict)
    prompts: dict[str, Requirement] = Field(default_factory=dict)


UPSTREAM_NAME = r"^[A-Za-z0-9_.-]+$"  # as the config's upstreams[].name


class PolicySpec(StrictModel):
    roles: dict[str, RoleSpec] = Field(min_length=1)
    bindings: tuple[BindingSpec, ...] = ()
    tools: dict[str, Requirement] = Field(default_factory=dict)
    resources: dict[str, Requirement] = Field(default_factory=dict)
    prompts: dict[str, Requirement] = Field(default_factory=dict)
    authentication_levels: AuthLevels = AuthLevels()
    unknown_methods: Literal["deny", "allow"] = "deny"
    deny_detail: Literal["minimal", "explain"] = "minimal"
    mode: Literal["enforce", "audit_only"] = "enforce"
    upstreams: dict[Annotated[str, StringConstraints(pattern=UPSTREAM_NAME)], UpstreamSpec] = Field(
        default_factory=dict)

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
        self._items("", self.tools, self.resources, self.prompts)
        for upstream, section in self.upstreams.items():
            for role_name in section.roles:
                if role_name not in self.roles:
                    raise ValueError(f"upstreams.{upstream}.roles names unknown role {role_name!r}")
            self._items(f"upstreams.{upstream}.", section.tools, section.resources, section.prompts)
        return self

    def _items(self, where: str, tools: Mapping[str, Requirement], resources: Mapping[str, Requirement],
               prompts: Mapping[str, Requirement]) -> None:
        for kind, items in (("resources", resources), ("prompts", prompts)):
            for name, requirement in items.items():
                if requirement.approval is not None:
                    raise ValueError(f"{where}{kind}.{name}.approval: approvals are for tools only")
                if requirement.arguments:
                    raise ValueError(f"{where}{kind}.{name}.arguments: argument constraints are for tools only")
        for name, requirement in tools.items():
            for approver in requirement.approval.approvers if requirement.approval else ():
                kind, _, value = approver.partition(":")
                if kind == "role" and value not in self.roles:
                    raise ValueError(f"{where}tools.{name}.approval.approvers names unknown role {value!r}")
