"""Argument constraints held against the tool they constrain: does its `inputSchema` agree?

Owns `schema_problems`, run when a policy meets a tool listing: a constraint on an argument the tool does
not declare never sees a value (or, unless optional, refuses every call), and one whose operators need a
type the schema rules out can never pass. Only `properties` and `type` are read: no `$ref`, no `anyOf`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.policy.constraints import ArgumentConstraint, describe_types


def schema_problems(mapping: Mapping[str, ArgumentConstraint], input_schema: Mapping[str, Any]) -> list[str]:
    """One `arguments.PATH: why` line for each constraint whose argument the schema lacks or mistypes."""
    problems = []
    for argument, constraint in mapping.items():
        keys = argument.split(".")
        node: Any = input_schema
        for depth, key in enumerate(keys):
            properties = node.get("properties") if isinstance(node, Mapping) else None
            if not isinstance(properties, Mapping) or key not in properties:
                name = ".".join(keys[: depth + 1])
                problems.append(f'arguments.{argument}: the tool\'s inputSchema has no property "{name}"')
                break
            node = properties[key]
        else:
            problem = _type_problem(constraint, node)
            if problem:
                problems.append(f"arguments.{argument}: {problem}")
    return problems


def _type_problem(constraint: ArgumentConstraint, schema: Any) -> str | None:
    declared = schema.get("type") if isinstance(schema, Mapping) else None  # absent: any type
    names = [declared] if isinstance(declared, str) else declared if isinstance(declared, list) else []
    types = {"number" if name == "integer" else name for name in names}  # an integer is a JSON number
    for what, accepted in constraint.type_needs() if types else ():
        if not accepted & types:
            return f"{what} needs {describe_types(accepted)}, the schema says {' or '.join(map(str, names))}"
    return None
