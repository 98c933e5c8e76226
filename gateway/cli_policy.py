"""`mcp-gateway policy lint`: the policy in force held against what the upstreams offer.

Owns the command's arguments, output and exit code (0 nothing to say, 1 problems found or an upstream could
not be asked, 2 a bad configuration). It asks each upstream for its tools itself (`upstream_tools`), through
the gateway's own connection, so it needs no client token and no running gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from gateway.config import load_config


def register(policy: Any) -> None:
    """Add `lint` to the `policy` subcommands."""
    lint = policy.add_parser("lint", help="check the policy's argument constraints against each upstream's tools")
    lint.add_argument("--config", required=True)
    lint.add_argument("--upstream", help="only this upstream (default: every one)")
    lint.set_defaults(func=_lint)


def _lint(args: argparse.Namespace) -> int:
    from gateway.policy.lint import schema_lint
    from gateway.upstream_tools import ListingFailed, list_tools

    config = load_config(args.config)
    upstreams = [u for u in config.upstreams if args.upstream in (None, u.name)]
    if not upstreams:
        print(f"no upstream named {args.upstream!r} (have: {', '.join(u.name for u in config.upstreams)})",
              file=sys.stderr)
        return 2
    found = False
    for upstream in upstreams:
        try:
            tools = asyncio.run(list_tools(config, upstream))
        except ListingFailed as exc:
            print(f"{config.source}: upstreams.{upstream.name}: cannot list its tools: {exc}")
            found = True
            continue
        problems = [problem for tool in tools if isinstance(tool.get("name"), str)
                    for problem in schema_lint(config.policy, tool["name"], tool.get("inputSchema") or {})]
        for problem in problems:
            print(f"{problem} (upstream {upstream.name})")
        found = found or bool(problems)
        print(f"upstream {upstream.name}: {len(tools)} tools, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if found else 0
