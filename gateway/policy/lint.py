"""Policy lint: what a policy says held against what an upstream offers, and names that will not match as meant.
Pure: values in, problems out, each as `FILE: key.path: why`, the form every other policy problem takes.

Owns `schema_lint` (for a tool as an upstream lists it, every set of argument constraints that applies to it,
on the tool and in each role's grants, checked against its `inputSchema` by `constraint_schema`; the gateway
runs it when it sees a tool listed and logs what it finds), `ambiguity_lint` (a grant at the top level whose
pattern matches tools of several upstreams) and `literal_lint` (a name that looks like a shell pattern but is
matched literally; logged at load too). `mcp-gateway policy lint` prints all three.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.policy.constraint_schema import schema_problems
from gateway.policy.globs import glob_regex
from gateway.policy.model import Policy


def literal_lint(policy: Policy) -> list[str]:
    """Every tool or prompt pattern with a character a shell would read as a wildcard (`ech?`, `get-{a,b}`,
    `[ab]`): only `*` and `**` are wildcards here, so it names exactly one odd name, which is rarely meant."""
    return [f"{policy.source}: {where}: {pattern!r} looks like a shell pattern, but only * and ** are wildcards: "
            f"it matches the {kind} named exactly that"
            for kind, pattern, where, _ in policy.name_patterns if _SHELL_WILDCARDS.search(pattern)]


_SHELL_WILDCARDS = re.compile(r"[?\[\]{}]")


def ambiguity_lint(policy: Policy, tools: Mapping[str, Sequence[str]]) -> list[str]:
    """Every tool a role is granted at the top level (on every upstream) by a pattern that matches tools of
    several upstreams (`tools`: upstream name -> its tools' names): the same name on two servers may be two
    different things, and `upstreams.NAME` says which one is meant. (A requirement at the top level is not
    named: being stricter on every upstream is what it is for.)"""
    problems = []
    for kind, pattern, where, upstream in policy.name_patterns:
        if kind != "tool" or upstream is not None or not where.startswith("roles."):
            continue
        regex = re.compile(glob_regex(pattern), re.DOTALL)
        matched = {upstream: [name for name in names if regex.fullmatch(name)] for upstream, names in tools.items()}
        on = sorted(upstream for upstream, names in matched.items() if names)
        if len(on) > 1:
            examples = "; ".join(f"{upstream}: {', '.join(sorted(matched[upstream])[:3])}" for upstream in on)
            problems.append(f"{policy.source}: {where}: {pattern!r} matches tools of {len(on)} upstreams ({examples}): "
                            f"if it is meant for one, grant it under upstreams.NAME instead")
    return problems


def schema_lint(policy: Policy, tool: str, input_schema: Mapping[str, Any]) -> list[str]:
    """Every constraint on `tool`'s arguments that its `inputSchema` does not have, or types otherwise."""
    problems = []
    for pattern, where, constraints in policy.argument_specs:
        if re.fullmatch(glob_regex(pattern), tool):
            for problem in schema_problems(constraints, input_schema):
                # schema_problems says `arguments.PATH: why`; the key path already ends in `.arguments`
                problems.append(f"{policy.source}: {where}{problem.removeprefix('arguments')} (tool {tool})")
    return problems
