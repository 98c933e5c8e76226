"""Policy lint: what a policy says held against what an upstream offers. Pure: values in, problems out.

Owns `schema_lint`: for a tool as an upstream lists it, every set of argument constraints that applies to it
(on the tool, and in each role's grants) checked against its `inputSchema` (`constraint_schema`), each problem
as `FILE: key.path: why`, the form every other policy problem takes. The gateway runs it when it sees a tool
listed (and logs what it finds); `mcp-gateway policy lint` prints it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gateway.policy.constraint_schema import schema_problems
from gateway.policy.globs import glob_regex
from gateway.policy.model import Policy


def schema_lint(policy: Policy, tool: str, input_schema: Mapping[str, Any]) -> list[str]:
    """Every constraint on `tool`'s arguments that its `inputSchema` does not have, or types otherwise."""
    problems = []
    for pattern, where, constraints in policy.argument_specs:
        if re.fullmatch(glob_regex(pattern), tool):
            for problem in schema_problems(constraints, input_schema):
                # schema_problems says `arguments.PATH: why`; the key path already ends in `.arguments`
                problems.append(f"{policy.source}: {where}{problem.removeprefix('arguments')} (tool {tool})")
    return problems
