"""`mcp-gateway tools list|approve|pin`: which tool definitions are pinned, which changed, and approving them;
`tools list --live`: what an upstream offers, asked of it directly, and what the policy makes of each tool.

Owns those commands' arguments, output and exit codes (as `cli_admin`'s: 0 done, 1 refused or unreachable, 2
bad configuration or arguments). Each is a client of the running gateway's admin API (`/admin/tools`), with a
one-minute token it signs with the gateway's key, as `cli_admin`'s commands are; `--as NAME` is who approved,
in the audit trail. `tools pin --write FILE` also writes the pins file the operator commits
(`upstreams[].pins_file`): a restarted gateway loads it, and its pins win over the store's. Only `--live` needs
the upstreams' credentials in the environment (`Config.require_upstream_secrets`).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from gateway.audit.reading import utc_time
from gateway.cli_admin import Column, _call, _print, _Refused, _segment
from gateway.config import Config, load_config
from gateway.pins import pins_file_text, short
from gateway.policy import LEVELS, Policy
from gateway.policy.engine import annotation_level


def register(commands: Any) -> None:
    """Add `tools` to the `mcp-gateway` parser's subcommands."""
    tools = commands.add_parser("tools", help="tool definitions: pinned, changed, new; approve them (via the "
                                "running gateway)")
    actions = tools.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="each tool: its pin, the definition last seen, pinned|changed|new")
    listing.add_argument("--upstream", help="only this upstream's tools")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    listing.add_argument("--live", action="store_true", help="ask the upstream itself, through the gateway's own "
                         "connection (no running gateway, no token): each tool with what the policy requires of it")
    approve = actions.add_parser("approve", help="pin the definition of NAME last seen: listed and callable again")
    approve.add_argument("name", help="the tool's name")
    approve.add_argument("--hash", help="only if the definition last seen is this one (a prefix will do), as "
                         "`tools list` showed it when you reviewed it")
    pin = actions.add_parser("pin", help="pin every definition of the upstream last seen")
    pin.add_argument("--write", metavar="FILE", help="also write the pins file to commit (upstreams[].pins_file)")
    for parser in (approve, pin):
        parser.add_argument("--upstream", help="the upstream's name (default: the only one)")
    for parser in (listing, approve, pin):
        parser.add_argument("--config", required=True)
        parser.add_argument("--url", help="the gateway's address; default: http://listen.host:listen.port")
        parser.add_argument("--as", dest="operator", default=getpass.getuser(),
                            help="who you are, in the token and the audit trail (default: your user name)")
        parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, upstream_secrets=False)
    scope = config.admin.tools_scope
    try:
        if args.action == "list" and args.live:
            return _list_live(args, config)
        if args.action == "list":
            query = f"?{urllib.parse.urlencode({'upstream': args.upstream})}" if args.upstream else ""
            _print(args, _call(args, config, "GET", f"/admin/tools{query}", scope)["tools"], _TOOLS)
            return 0
        upstream = _upstream(args, config)
        if args.action == "approve":
            path = f"/admin/tools/{_segment(upstream)}/{_segment(args.name)}/approve"
            answer = _call(args, config, "POST", path, scope, {"hash": args.hash})
            print(f"approved {args.name} at {upstream}: {short(answer['previous'])} -> {short(answer['pinned'])}")
            return 0
        answer = _call(args, config, "POST", f"/admin/tools/{_segment(upstream)}/pin", scope, {})
        print(f"pinned every definition of {upstream} last seen: {len(answer['pins'])} tool(s)")
        if answer["held_by_file"]:
            print(f"the pins file holds {', '.join(answer['held_by_file'])} to other definitions until it is "
                  "written anew and the gateway restarted", file=sys.stderr)
        if args.write:
            Path(args.write).write_text(pins_file_text(answer["pins"]))
            print(f"wrote {args.write}: name it in upstreams[].pins_file of {upstream}, and commit it")
    except _Refused as refused:
        print(refused, file=sys.stderr)
        return refused.code
    except OSError as failed:
        print(f"--write {args.write}: {failed.strerror or failed}", file=sys.stderr)
        return 2
    return 0


def _list_live(args: argparse.Namespace, config: Config) -> int:
    """What each upstream offers, asked of it directly, beside what the policy in force makes of each tool."""
    from gateway.upstream_tools import ListingFailed, list_tools

    upstreams = [u for u in config.upstreams if args.upstream in (None, u.name)]
    if not upstreams:
        raise _Refused(f"--upstream: one of {', '.join(u.name for u in config.upstreams)}", 2)
    rows, failed = [], False
    for upstream in upstreams:
        try:
            tools = asyncio.run(list_tools(config, upstream))
        except ListingFailed as exc:
            print(f"upstream {upstream.name}: cannot list its tools: {exc}", file=sys.stderr)
            failed = True
            continue
        rows.extend(tool_rows(config.policy.for_upstream(upstream.name), upstream.name, tools))
    _print(args, rows, _LIVE)
    if config.policy.engine is not None:
        print("a Cedar policy decides each call on its own: `mcp-gateway policy explain` says how", file=sys.stderr)
    return 1 if failed else 0


def tool_rows(policy: Policy, upstream: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tool an upstream lists: its name, title, hints, and what `policy` (as it holds on that upstream)
    requires of it: the level, whether arguments are constrained, which roles may call it (under a Cedar
    policy, only the level its annotations ask for)."""
    rows = []
    for tool in tools:
        name = tool.get("name")
        if not isinstance(name, str):
            continue
        # as enforced: a rule in mode audit_only neither requires its level nor silences the annotations'
        level = policy.tools.required_level(name, annotation_level(tool.get("annotations")), enforced_only=True)
        annotations, description = tool.get("annotations"), tool.get("description")
        annotations = annotations if isinstance(annotations, dict) else {}
        description = description if isinstance(description, str) else ""
        rows.append({
            "upstream": upstream, "tool": name, "title": tool.get("title") or annotations.get("title") or "",
            "level": LEVELS[level], "arguments_constrained": policy.constrained_tools.matches(name),
            "roles": sorted(role.name for role in policy.roles.values() if role.tools.matches(name)),
            "hints": sorted(key for key, value in annotations.items() if key.endswith("Hint") and value is True),
            "description": description.strip().split("\n", 1)[0],
        })
    return rows


def _upstream(args: argparse.Namespace, config: Config) -> str:
    names = [u.name for u in config.upstreams]
    if args.upstream is None and len(names) == 1:
        return names[0]
    if args.upstream not in names:
        raise _Refused(f"--upstream: one of {', '.join(names)}", 2)
    return str(args.upstream)


def _shown(text: str) -> str:
    """An upstream's text as a terminal may show it: no control characters (no escape sequences)."""
    return "".join(c if c.isprintable() else "?" for c in text)


_LIVE: list[Column] = [
    ("UPSTREAM", 12, lambda i: i["upstream"]), ("TOOL", 24, lambda i: _shown(i["tool"])),
    ("LEVEL", 8, lambda i: i["level"]), ("ARGS", 5, lambda i: "yes" if i["arguments_constrained"] else "-"),
    ("ROLES", 20, lambda i: ",".join(i["roles"]) or "-"),
    ("HINTS", 24, lambda i: _shown(",".join(i["hints"])) or "-"),
    ("DESCRIPTION", 0, lambda i: _shown(i["description"][:60])),
]
_TOOLS: list[Column] = [
    ("UPSTREAM", 12, lambda i: i["upstream"]), ("TOOL", 24, lambda i: i["tool"]),
    ("STATUS", 8, lambda i: i["status"]), ("MODE", 8, lambda i: i["mode"]),
    ("PINNED", 13, lambda i: short(i["pinned"])), ("BY", 12, lambda i: i["pinned_by"] or "-"),
    ("LAST SEEN", 13, lambda i: short(i["seen"])),
    ("SEEN AT", 0, lambda i: utc_time(i["seen_at"]) if i["seen_at"] else "-"),
]
