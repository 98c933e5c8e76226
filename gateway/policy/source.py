"""Which policy a gateway enforces: the config's `policy:` key, and loading what it names (again, on reload).

Owns the key's two forms, a path to a YAML policy file, or

    policy:
      engine: cedar              # yaml | cedar (default: cedar for a .cedar file, else yaml)
      file: policies/mcp.cedar   # relative to the config file
      mode: enforce              # cedar only: enforce | audit_only (refusals recorded as would_deny, not enforced)
      deny_detail: minimal       # cedar only: minimal | explain
      unknown_methods: deny      # cedar only: deny | allow

(a YAML policy file holds those three settings itself); `load_policy_source`, and `reread_policy`, which
reads the same file again in the same language with the same settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError, model_validator

from gateway.policy.model import Policy, load_policy
from gateway.policy.spec import PolicyError
from gateway.yamlfile import StrictModel, format_validation

_CEDAR_SETTINGS = ("mode", "deny_detail", "unknown_methods")


class PolicySource(StrictModel):
    engine: Literal["yaml", "cedar"] | None = None
    file: str
    mode: Literal["enforce", "audit_only"] = "enforce"
    deny_detail: Literal["minimal", "explain"] = "minimal"
    unknown_methods: Literal["deny", "allow"] = "deny"

    @model_validator(mode="after")
    def _settings_for_cedar(self) -> PolicySource:
        given = [key for key in _CEDAR_SETTINGS if key in self.model_fields_set]
        if self.language == "yaml" and given:
            raise ValueError(f"{', '.join(given)}: set in the YAML policy file itself, not here")
        return self

    @property
    def language(self) -> Literal["yaml", "cedar"]:
        return self.engine or ("cedar" if self.file.endswith(".cedar") else "yaml")


class _PolicyKey(StrictModel):
    policy: PolicySource


def load_policy_source(value: Any, config_file: Path) -> Policy:
    """The policy the config's `policy:` key names (a path, or a mapping as above); PolicyError lists every
    problem, the config's own as `CONFIG: policy.KEY: why`."""
    if isinstance(value, str):
        value = {"file": value}
    if not isinstance(value, dict):
        raise PolicyError([f"{config_file}: policy: a path to a policy file, or {{engine, file, ...}}"])
    try:
        source = _PolicyKey.model_validate({"policy": value}).policy
    except ValidationError as exc:
        raise PolicyError(format_validation(str(config_file), exc)) from None
    path = Path(source.file)
    if not path.is_absolute():
        path = config_file.parent / path
    if source.language == "yaml":
        if path.suffix == ".cedar":
            raise PolicyError([f"{config_file}: policy.engine: yaml, but {path.name} is a Cedar policy"])
        return load_policy(path)
    from gateway.policy.cedar import load_cedar_policy  # cedarpy is loaded only for a Cedar policy

    return load_cedar_policy(path, mode=source.mode, deny_detail=source.deny_detail,
                             unknown_methods=source.unknown_methods)


def reread_policy(policy: Policy) -> Policy:
    """`policy`'s file read and compiled again: in the same language, with the settings the config gave it."""
    path = Path(policy.source)
    if policy.engine is None:
        return load_policy(path)
    from gateway.policy.cedar import load_cedar_policy

    return load_cedar_policy(path, mode=policy.mode, deny_detail=policy.deny_detail,
                             unknown_methods=policy.unknown_methods)


def policy_files(policy: Policy) -> tuple[Path, ...]:
    """The files `policy` was read from, whose change calls for a reload: the policy file, and for a Cedar policy
    the schema beside it (`NAME.cedarschema.json`), whether it exists yet or not."""
    path = Path(policy.source)
    if policy.engine is None:
        return (path,)
    from gateway.policy.cedar_source import schema_path  # cedarpy is loaded only for a Cedar policy

    return (path, schema_path(path))
