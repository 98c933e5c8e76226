"""Reading the audit trail back: the query parameters people type, and the sink to read from.

Owns the translation of `--since 1h` / `?since=2026-11-23T10:00:00Z` style
parameters into an `AuditQuery`, and the choice of which configured sink
answers (the first that can be queried by index: sqlite, then postgres, else jsonl).
Readers are separate from the writer's sinks, so a query never shares a
connection with the writer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.audit.sinks import AuditQuery, Sink, open_sink
from gateway.config import Audit
from gateway.exceptions import GatewayError

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIMIT = 1000


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

    since, until = params.get("since"), params.get("until")
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


def table(events: list[dict[str, Any]]) -> list[str]:
    """Events as `audit query` prints them: one aligned line each, under a header."""
    columns = ("time", "result", "operation", "target", "user", "client", "reason", "status")
    rows = [(
        utc_time(e.get("timestamp")), str(e.get("result")), str(e.get("operation") or e.get("http_method")),
        str(e.get("tool_executed") or e.get("prompt") or e.get("resource_accessed") or ""),
        str(e.get("user_id") or ""), str(e.get("client_id") or ""), str(e.get("reason")), str(e.get("status") or ""),
    ) for e in events]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    return ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
            for row in (columns, *rows)]


def utc_time(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")
