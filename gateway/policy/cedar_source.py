"""A Cedar policy file read and checked: its policies, where each one is, and every problem as `FILE: line N: why`.

Owns the reading of a `.cedar` file before the engine (`gateway.policy.cedar`) compiles it: the syntax
(Cedar's parser says what is wrong, not where, so the file is cut into its policies to find the line of
each one that does not parse), the gateway's annotations (`@id`, `@step_up`, `@mode`), and validation
against the gateway's schema (`cedar_schema`), or against `NAME.cedarschema.json` beside the file when there
is one (the same schema with argument types, as `mcp-gateway policy cedar-schema` prints it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cedarpy

from gateway.policy.cedar_schema import base_schema, read_schema_file
from gateway.policy.model import LEVEL, LEVELS, PolicyError

_MODES = ("enforce", "audit_only")
_CEDAR_POLICY_ID = re.compile(r"for policy `[^`]*`, ")


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy of the file, as the engine words a decision it takes part in."""

    id: str  # its @id, else the id Cedar gives it (policy0, policy1, ... in file order)
    position: int  # in the file: the first policy that decides names the decision
    line: int | None
    forbid: bool
    step_up: int | None = None  # @step_up("LEVEL"): short of it, the caller is asked to authenticate again
    audit_only: bool = False  # @mode("audit_only"): what it refuses passes, recorded as would_deny
    reads_arguments: bool = False  # its conditions read context.arguments

    @property
    def soft(self) -> bool:
        """Refuses in a way other than outright: a step-up, or only in the audit log."""
        return self.step_up is not None or self.audit_only


@dataclass(frozen=True, slots=True)
class CedarSource:
    """A Cedar policy file that parses and validates: its text, each policy's parsed form (Cedar's JSON form,
    by Cedar's policy id) and rule, and the version (digest of the file, and of the schema if one is used)."""

    path: Path
    text: str
    policies: Mapping[str, Mapping[str, Any]]
    rules: Mapping[str, Rule]
    version: str


def schema_path(path: Path) -> Path:
    """Where a schema with the upstream's argument types is kept for the policy at `path`."""
    return path.with_name(f"{path.stem}.cedarschema.json")


def read_cedar(path: Path, schema: Mapping[str, Any] | None = None) -> CedarSource:
    """Read, parse and validate a Cedar policy file against `schema`, or the schema file beside it, or the
    gateway's base schema. PolicyError lists every problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError([f"{path}: (file): cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise PolicyError([f"{path}: (file): not UTF-8 text"]) from None
    digest = hashlib.sha256(data)
    if schema is None:
        schema, schema_data = _schema_beside(path)
        digest.update(schema_data)
    statements = _statements(text)
    try:
        parsed = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        raise PolicyError(_syntax_problems(path, statements, str(exc))) from None
    policies: dict[str, Any] = parsed.get("staticPolicies", {})
    templates = parsed.get("templates", {})
    # Cedar numbers the policies of a text policy0, policy1, ... in order: one per statement
    lines = ({pid: statements[_position(pid)][0] for pid in (*policies, *templates)}
             if len(policies) + len(templates) == len(statements) else {})
    problems = [f"{path}: {_at(lines.get(pid))}: a template (?principal, ?resource) is not a policy the gateway "
                "can apply" for pid in templates]
    if not policies and not problems:
        problems.append(f"{path}: (file): no policies: every request would be refused")
    rules: dict[str, Rule] = {}
    for pid, policy in policies.items():
        rule, why = _rule(pid, policy, lines.get(pid))
        rules[pid] = rule
        problems.extend(f"{path}: {_at(rule.line)}: {w}" for w in why)
    result = cedarpy.validate_policies(text, json.dumps(schema))
    invalid = sorted((lines.get(error.policy_id) or 0, _CEDAR_POLICY_ID.sub("", error.error))
                     for error in result.errors)
    problems.extend(f"{path}: {_at(line or None)}: {why}" for line, why in invalid)
    if problems:
        raise PolicyError(problems)
    return CedarSource(path, text, policies, rules, digest.hexdigest()[:12])


def _position(pid: str) -> int:
    """Where Cedar's id `policyN` puts a policy in its file."""
    number = pid.removeprefix("policy")
    return int(number) if number.isdigit() else -1


def _at(line: int | None) -> str:
    return f"line {line}" if line is not None else "(file)"


def _schema_beside(path: Path) -> tuple[Mapping[str, Any], bytes]:
    beside = schema_path(path)
    if not beside.exists():
        return base_schema(), b""
    try:
        return read_schema_file(beside)
    except (OSError, ValueError) as exc:
        raise PolicyError([f"{beside}: (file): {exc}"]) from None


def _rule(pid: str, policy: Mapping[str, Any], line: int | None) -> tuple[Rule, list[str]]:
    annotations = policy.get("annotations") or {}
    forbid = policy.get("effect") == "forbid"
    why = []
    step_up = annotations.get("step_up")
    if step_up is not None and (not forbid or step_up not in LEVEL):
        why.append(f"@step_up({json.dumps(step_up)}): on a forbid, with a level: {', '.join(LEVELS)}")
    mode = annotations.get("mode", "enforce")
    if mode not in _MODES or (mode != "enforce" and not forbid):
        why.append(f"@mode({json.dumps(mode)}): on a forbid, one of {', '.join(_MODES)}")
    rule = Rule(annotations.get("id") or pid, _position(pid), line, forbid,
                step_up=LEVEL.get(str(step_up)) if step_up is not None else None, audit_only=mode == "audit_only",
                reads_arguments='"arguments"' in json.dumps(policy.get("conditions", [])))
    return rule, why


def _syntax_problems(path: Path, statements: list[tuple[int, str]], whole: str) -> list[str]:
    """Each policy that does not parse on its own, at its line (Cedar's message says what, not where)."""
    problems = []
    for line, statement in statements:
        try:
            cedarpy.policies_to_json_str(statement)
        except ValueError as exc:
            problems.append(f"{path}: line {line}: {exc}")
    return problems or [f"{path}: (file): {whole}"]


def _statements(text: str) -> list[tuple[int, str]]:
    """The text cut after each `;` outside string literals and `//` comments: (line of its first token, text)."""
    out: list[tuple[int, str]] = []
    start, line, first, i, end = 0, 1, 0, 0, len(text)
    while i < end:
        char = text[i]
        if char == "\n":
            line += 1
        elif text.startswith("//", i):
            newline = text.find("\n", i)
            i = end if newline < 0 else newline
            continue
        elif char == ";":
            out.append((first or line, text[start:i + 1]))
            start, first = i + 1, 0
        elif not char.isspace():
            first = first or line
            if char == '"':
                i += 1
                while i < end and text[i] != '"':
                    line += text[i] == "\n"
                    i += 2 if text[i] == "\\" else 1
        i += 1
    if first:
        out.append((first, text[start:]))
    return out


def schema_problems(path: Path, schema: Mapping[str, Any]) -> list[str]:
    """Every problem of the Cedar policy at `path` against `schema` (one generated from an upstream's tools:
    `cedar_schema.tool_schema`), as `FILE: line N: why`."""
    try:
        read_cedar(path, schema)
    except PolicyError as exc:
        return exc.problems
    return []
