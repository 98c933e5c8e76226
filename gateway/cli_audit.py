"""`mcp-gateway audit query|verify`: the audit trail read back, newest first, a page at a time or as it grows;
and each sink's hash chain checked with the chain key.

Owns those commands' arguments, output and exit codes (0 done, 1 a sink that cannot be read or a broken chain,
2 bad arguments or configuration). Both read the sinks themselves (no running gateway, no upstream's
credentials) and never create one: a sink that does not exist yet or cannot be reached is said in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import TYPE_CHECKING, Any

from gateway.audit.reading import FOLLOW_INTERVAL_S, MAX_LIMIT
from gateway.config import load_config

if TYPE_CHECKING:
    from gateway.audit.sinks import AuditQuery, Sink


def register(commands: Any) -> None:
    """Add `audit query` and `audit verify` to the `mcp-gateway` parser's subcommands."""
    audit = commands.add_parser("audit", help="read and verify the audit trail").add_subparsers(dest="action",
                                                                                               required=True)
    query = audit.add_parser("query", help="print audit events, newest first")
    query.add_argument("--config", required=True)
    query.add_argument("--sink", help="index or type of the sink to read (default: sqlite, postgres, then jsonl)")
    query.add_argument("--since", help="15m, 1h, 2d, an ISO 8601 time or UNIX seconds")
    query.add_argument("--until", help="only events before this time (as --since): the next page starts at the "
                       "time a full page names on stderr")
    query.add_argument("--user")
    query.add_argument("--client")
    query.add_argument("--operation", help="e.g. tools/call")
    query.add_argument("--tool")
    query.add_argument("--resource")
    query.add_argument("--result", choices=["allowed", "denied", "rate_limited", "auth_failed", "invalid_request",
                                            "upstream_error", "error"])
    query.add_argument("--rule", help="the rule or check that decided, e.g. role:reader:tool")
    query.add_argument("--policy-version", help="decided under this policy version")
    query.add_argument("--would-deny", help="allowed under mode audit_only, that this rule would have refused")
    query.add_argument("--limit", type=int, default=100, help=f"at most this many events (default 100, most "
                       f"{MAX_LIMIT}); when more match, stderr says how many and where the next page starts")
    query.add_argument("--offset", type=int, default=0, help="skip this many of the newest")
    query.add_argument("--follow", action="store_true", help=f"print the newest --limit events oldest first, then "
                       f"each new one as it is recorded (read every {FOLLOW_INTERVAL_S} s) until Ctrl-C or "
                       "SIGTERM; with --format json, one event per line")
    query.add_argument("--format", choices=["table", "json"], default="table")
    query.set_defaults(func=_query)
    verify = audit.add_parser("verify", help="check every sink's hash chain with the chain key "
                              "(audit.chain_key_file); report the first broken link")
    verify.add_argument("--config", required=True)
    verify.add_argument("--sink", help="index or type of one sink (default: all)")
    verify.set_defaults(func=_verify)


def _query(args: argparse.Namespace) -> int:
    from gateway.audit.reading import BadQuery, iso_time, newest_page, query_from, reader_for, table

    if args.follow and (args.until is not None or args.offset):
        print("audit query --follow: the newest events, then those that come: no --until or --offset",
              file=sys.stderr)
        return 2
    config = load_config(args.config, upstream_secrets=False)
    try:
        query = query_from({"since": args.since, "until": args.until, "user": args.user, "client": args.client,
                            "operation": args.operation, "tool": args.tool, "resource": args.resource,
                            "result": args.result, "rule": args.rule, "policy_version": args.policy_version,
                            "would_deny": args.would_deny, "limit": str(args.limit), "offset": str(args.offset),
                            "order": "newest"})
        reader = reader_for(config.audit, args.sink)
    except BadQuery as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.follow:
        asyncio.run(_follow(reader, query, args.format))
        return 0

    async def read() -> tuple[list[dict[str, Any]], int]:
        try:
            return await newest_page(reader, query)
        finally:
            await reader.close()

    events, more = asyncio.run(read())  # SinkUnreadable: `main` says it in one line
    if args.format == "json":
        print(json.dumps(events, indent=2))
    else:
        for line in table(events):
            print(line)
        print(f"{len(events)} event(s) from {reader.name}")
    if more:
        print(f"{more} more (use --until {iso_time(events[-1]['timestamp'])} or --limit)", file=sys.stderr)
    return 0


async def _follow(reader: Sink, query: AuditQuery, form: str) -> None:
    """The newest page, oldest first, then each event as it comes, until SIGINT or SIGTERM."""
    from gateway.audit.reading import column_widths, follow, newest_page, table

    widths: tuple[int, ...] = ()

    def show(events: list[dict[str, Any]], header: bool = False) -> None:
        lines = [json.dumps(e) for e in events] if form == "json" else table(events, widths)[0 if header else 1:]
        for line in lines:
            print(line, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        shown, _ = await newest_page(reader, query)
        widths = column_widths(shown)  # once: the rows printed later line up with the header printed now
        show(shown[::-1], header=True)
        await follow(reader, query, shown, show, stop)
    finally:
        await reader.close()


def _verify(args: argparse.Namespace) -> int:
    """Check every event of each sink against the chain key; exit 1 on the first broken link of any sink."""
    from gateway.audit.chainkey import read_chain_key
    from gateway.audit.event import ChainReport
    from gateway.audit.sinks import SinkUnreadable, open_sink

    config = load_config(args.config, upstream_secrets=False)
    specs = list(enumerate(config.audit.sinks))
    if args.sink is not None:
        specs = [(i, s) for i, s in specs if str(i) == args.sink or s.type == args.sink]
        if not specs:
            print(f"no audit sink {args.sink!r}", file=sys.stderr)
            return 2
    key = read_chain_key(config.audit.chain_key_file)  # never created here: a new key would vouch for nothing

    async def check(sink: Sink) -> ChainReport:
        try:
            return await sink.verify(key)
        finally:
            await sink.close()

    broken = False
    for _, spec in specs:
        sink = open_sink(spec)
        try:
            report = asyncio.run(check(sink))
        except SinkUnreadable as exc:  # the other sinks are still checked
            print(f"mcp-gateway: {exc}", file=sys.stderr)
            broken = True
            continue
        if report.ok:
            print(f"{sink.name}: OK, {report.count} events, chain intact")
        else:
            broken = True
            print(f"{sink.name}: BROKEN at event {report.broken_at} (id {report.event_id}): {report.why}")
    return 1 if broken else 0
