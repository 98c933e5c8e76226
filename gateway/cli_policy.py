"""`mcp-gateway policy lint` and `policy cedar-schema`: the policy in force held against what the upstreams offer.

Owns the command's arguments, output and exit code (0 nothing to say, 1 problems found or an upstream could
not be asked, 2 a bad configuration). It asks each upstream for its tools itself (`upstream_tools`), through
the gateway's own connection, so it needs no client token and no running gateway. A Cedar policy is validated
against the schema its upstreams' tools give (`cedar_schema.tool_schema`), which `cedar-schema` prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from gateway.config import Config, Upstream, load_config


def register(policy: Any) -> None:
    """Add `lint` and `cedar-schema` to the `policy` subcommands."""
    lint = policy.add_parser("lint", help="check the policy against each upstream's tools: argument constraints "
                             "(problems, exit 1); names matching tools of several upstreams and names that look "
                             "like shell patterns (warnings)")
    lint.add_argument("--config", required=True)
    lint.add_argument("--upstream", help="only this upstream (default: every one)")
    lint.set_defaults(func=_lint)
    schema = policy.add_parser("cedar-schema", help="print the Cedar schema (JSON) with the argument types of the "
                               "upstreams' tools; kept as NAME.cedarschema.json beside NAME.cedar, the policy is "
                               "validated against it when it loads")
    schema.add_argument("--config", required=True)
    schema.add_argument("--upstream", help="only this upstream's tools (default: every one's)")
    schema.set_defaults(func=_cedar_schema)


def _lint(args: argparse.Namespace) -> int:
    from gateway.policy.lint import ambiguity_lint, literal_lint, schema_lint
    from gateway.upstream_tools import ListingFailed, list_tools

    config = load_config(args.config)
    upstreams = _upstreams(args, config)
    if not upstreams:
        return 2
    warnings = literal_lint(config.policy)
    found = False
    names: dict[str, list[str]] = {}
    listed: list[dict[str, Any]] = []
    for upstream in upstreams:
        try:
            tools = asyncio.run(list_tools(config, upstream))
        except ListingFailed as exc:
            print(f"{config.source}: upstreams.{upstream.name}: cannot list its tools: {exc}")
            found = True
            continue
        names[upstream.name] = [tool["name"] for tool in tools if isinstance(tool.get("name"), str)]
        listed.extend(tools)
        problems = [problem for tool in tools if isinstance(tool.get("name"), str)
                    for problem in schema_lint(config.policy.for_upstream(upstream.name), tool["name"],
                                               tool.get("inputSchema") or {})]
        for problem in problems:
            print(f"{problem} (upstream {upstream.name})")
        found = found or bool(problems)
        print(f"upstream {upstream.name}: {len(tools)} tools, {len(problems)} problem(s)", file=sys.stderr)
    if config.policy.engine is not None:
        problems = _cedar_problems(config, listed)
        for problem in problems:
            print(problem)
        found = found or bool(problems)
    warnings += ambiguity_lint(config.policy, names)
    for warning in warnings:
        print(f"warning: {warning}")
    return 1 if found else 0


def _upstreams(args: argparse.Namespace, config: Config) -> list[Upstream]:
    """The upstreams `--upstream` names (every one without it); none, said on stderr, for a name there is not."""
    upstreams = [u for u in config.upstreams if args.upstream in (None, u.name)]
    if not upstreams:
        print(f"no upstream named {args.upstream!r} (have: {', '.join(u.name for u in config.upstreams)})",
              file=sys.stderr)
    return upstreams


def _cedar_problems(config: Config, tools: list[dict[str, Any]]) -> list[str]:
    from gateway.policy.cedar_schema import tool_schema
    from gateway.policy.cedar_source import schema_problems

    return schema_problems(Path(config.policy.source), tool_schema(tools))


def _cedar_schema(args: argparse.Namespace) -> int:
    from gateway.policy.cedar_schema import tool_schema
    from gateway.upstream_tools import ListingFailed, list_tools

    config = load_config(args.config)
    upstreams = _upstreams(args, config)
    if not upstreams:
        return 2
    tools: list[dict[str, Any]] = []
    for upstream in upstreams:
        try:
            tools.extend(asyncio.run(list_tools(config, upstream)))
        except ListingFailed as exc:
            print(f"{config.source}: upstreams.{upstream.name}: cannot list its tools: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(tool_schema(tools), indent=2))
    return 0
