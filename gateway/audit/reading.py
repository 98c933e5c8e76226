"""Reading the audit trail back: the query parameters people type, and the sink to read from.

Owns the translation of `--since 1h` / `?since=2026-11-23T10:00:00Z` style
parameters into an `AuditQuery`, and the choice of which configured sink
answers (the first that can be queried by index: sqlite, then postgres, else jsonl).
Readers are separate from the writer's sinks, so a query never shares a
connection with the writer. Also how a page says there is more (`newest_page`),
following the trail as it grows (`follow`), and events as a terminal is shown
them (`table`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.audit.sinks import AuditQuery, Sink, open_sink
from gateway.config import Audit
from gateway.exceptions import GatewayError
from gateway.logs import escape_controls

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIMIT = 1000
FOLLOW_INTERVAL_S = 0.5
# An event can reach a sink a little after its timestamp (the writer batches; replicas' clocks differ): `follow`
# reads back this far behind the newest event it has seen, and skips the ids it has shown.
FOLLOW_LOOKBACK_S = 10.0


class BadQuery(GatewayError, ValueError):
    """A query parameter that cannot be understood; the message says which and why."""


def parse_duration(value: str) -> float:
    """`90s`, `15m`, `1h`, `2d` as seconds."""
    relative = _RELATIVE.match(value.strip())
    if relative is None:
        raise BadQuery(f"{value!r} is not a duration (use 90s, 15m, 2h or 1d)")
    return float(relative.group(1)) * _UNITS[relative.group(2)]


def parse_time(value: str, now: float | None = None) -> float:
    """`90s`, `15m`, `1h`, `2d` (ago), an ISO 8601 time, or UNIX seconds."""
    now = time.time() if now is None else now
    if _RELATIVE.match(value.strip()):
        return now - parse_duration(value)
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise BadQuery(f"{value!r} is not a time (use 15m, 1h, 2d, an ISO 8601 time or UNIX seconds)") from None


def query_from(params: Mapping[str, str | None]) -> AuditQuery:
    """An AuditQuery from named parameters (CLI options or URL query), validated."""
    def number(name: str, default: int, most: int) -> int:
        raw = params.get(name)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) > most:
            raise BadQuery(f"{name} must be a whole number from 0 to {most}")
        return int(raw)

    since, until, order = params.get("since"), params.get("until"), params.get("order")
    if order not in (None, "oldest", "newest"):
        raise BadQuery("order must be oldest or newest")
    return AuditQuery(
        since=parse_time(since) if since else None,
        until=parse_time(until) if until else None,
        user_id=params.get("user"),
        client_id=params.get("client"),
        operation=params.get("operation"),
        tool=params.get("tool"),
        resource=params.get("resource"),
        result=params.get("result"),
        rule=params.get("rule"),
        policy_version=params.get("policy_version"),
        would_deny=params.get("would_deny"),
        limit=number("limit", 100, MAX_LIMIT),
        offset=number("offset", 0, 10**9),
        order="newest" if order == "newest" else "oldest",
    )


def reader_for(config: Audit, choice: str | None = None) -> Sink:
    """A fresh reader for sink `choice` (an index or a type), or the best queryable one."""
    specs = list(config.sinks)
    if choice is not None:
        if choice.isdigit() and int(choice) < len(specs):
            return open_sink(specs[int(choice)])
        for spec in specs:
            if spec.type == choice:
                return open_sink(spec)
        raise BadQuery(f"no audit sink {choice!r} (have: {', '.join(s.type for s in specs)})")
    for kind in ("sqlite", "postgres", "jsonl"):
        for spec in specs:
            if spec.type == kind:
                return open_sink(spec)
    return open_sink(specs[0])


async def newest_page(reader: Sink, query: AuditQuery) -> tuple[list[dict[str, Any]], int]:
    """The newest events matching `query` (newest first), and how many older ones match beyond the page: those
    `until` = the oldest shown's timestamp reads next (events of that very instant not shown are not counted)."""
    query = dataclasses.replace(query, order="newest")
    events = await reader.query(query)
    if not events or len(events) < query.limit:
        return events, 0
    return events, await reader.count(dataclasses.replace(query, until=events[-1]["timestamp"], offset=0))


async def follow(reader: Sink, query: AuditQuery, shown: list[dict[str, Any]],
                 emit: Callable[[list[dict[str, Any]]], None], stop: asyncio.Event) -> None:
    """Until `stop` is set, read every FOLLOW_INTERVAL_S the events matching `query`'s filters recorded since the
    page `shown` (the newest `query.limit`), and `emit` those not emitted before, oldest first."""
    known = {e.get("id"): float(e["timestamp"]) for e in shown}
    floor = query.since
    if shown and len(shown) >= query.limit:  # older events were left out of the page: they are not new
        floor = min(known.values())
    newest = max(known.values(), default=time.time())
    while not stop.is_set():
        since = newest - FOLLOW_LOOKBACK_S if floor is None else max(floor, newest - FOLLOW_LOOKBACK_S)
        window = dataclasses.replace(query, since=since, until=None, order="oldest", limit=MAX_LIMIT, offset=0)
        fresh: list[dict[str, Any]] = []
        while True:
            page = await reader.query(window)
            fresh += [e for e in page if e.get("id") not in known]
            if len(page) < MAX_LIMIT:
                break
            window = dataclasses.replace(window, offset=window.offset + len(page))
        for event in fresh:
            known[event.get("id")] = float(event["timestamp"])
            newest = max(newest, float(event["timestamp"]))
        if fresh:
            emit(fresh)
        known = {i: t for i, t in known.items() if t >= since}  # no later read goes back before `since`
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FOLLOW_INTERVAL_S)


_COLUMNS = ("time", "result", "operation", "target", "user", "client", "reason", "status")
# The narrowest each column is: `--follow` keeps the widths of its first page, which may be narrow or empty.
_MIN_WIDTHS = (19, 15, 14, 20, 12, 12, 20, 6)


def table(events: list[dict[str, Any]], widths: tuple[int, ...] | None = None) -> list[str]:
    """Events as `audit query` prints them: a header, then one line each, in columns `widths` wide (default:
    `column_widths(events)`). A value wider than its column is cut to fit, ending in `...`: rows printed later
    under the same header (`--follow`) line up with it. What callers wrote (a tool's name, a reason) is printed
    with its control characters escaped, as log lines write them: it cannot forge a row or drive the terminal."""
    widths = widths or column_widths(events)
    return [_row(cells, widths) for cells in (_COLUMNS, *map(_cells, events))]


def column_widths(events: list[dict[str, Any]]) -> tuple[int, ...]:
    """Each column's width for `events`: its widest value's, or its heading's, or `_MIN_WIDTHS`'."""
    rows = [_cells(e) for e in events]
    return tuple(max([least, len(heading), *(len(row[i]) for row in rows)])
                 for i, (heading, least) in enumerate(zip(_COLUMNS, _MIN_WIDTHS, strict=True)))


def _cells(event: dict[str, Any]) -> tuple[str, ...]:
    return tuple(escape_controls(value) for value in (
        utc_time(event.get("timestamp")), str(event.get("result")),
        str(event.get("operation") or event.get("http_method")),
        str(event.get("tool_executed") or event.get("prompt") or event.get("resource_accessed") or ""),
        str(event.get("user_id") or ""), str(event.get("client_id") or ""), str(event.get("reason")),
        str(event.get("status") or "")))


def _row(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    fitted = (value.ljust(width) if len(value) <= width else f"{value[:width - 3]}..."
              for value, width in zip(cells, widths, strict=True))
    return "  ".join(fitted).rstrip()


def utc_time(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso_time(timestamp: float) -> str:
    """`timestamp` to the microsecond, as `parse_time` reads it back exactly (events are stamped to the µs)."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
