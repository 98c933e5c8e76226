"""The audit trail as the console shows it: newest first, one row per event.

Owns `newest`, which finds the newest events matching the filters out of a reader that returns pages in time
order (oldest first, at most `MAX_LIMIT` per read, like `operators.read_audit`): it reads a window ending at
`until` (or now), and narrows the window while it comes back full or widens it while it holds too few,
within a bounded number of reads. Also `row`, what one event shows (the page's table and the live tail's
JSON alike), and `FILTERS`, the query parameters both pass on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from gateway.audit.reading import MAX_LIMIT, parse_time, utc_time

Read = Callable[[dict[str, str]], Awaitable[list[dict[str, Any]]]]
FILTERS = ("user", "client", "tool", "result")
RESULTS = ("allowed", "denied", "auth_failed", "invalid_request", "upstream_error", "error")
_FIRST_SPAN_S = 300.0
_GROWTH = 8.0
_MOST_READS = 12
_FOREVER_S = 100 * 365 * 86400.0


async def newest(read: Read, params: Mapping[str, str], count: int, now: float) -> list[dict[str, Any]]:
    """The newest `count` events (newest first) matching `params`' filters, `since` and `until`.

    BadQuery (from `parse_time`) for a `since` or `until` that is not a time."""
    filters = {k: params[k] for k in FILTERS if params.get(k)}
    end = parse_time(params["until"], now) if params.get("until") else now + 1
    start = parse_time(params["since"], now) if params.get("since") else None
    span = _FIRST_SPAN_S
    too_few: float | None = None  # the widest span known to hold fewer than `count`
    too_many: float | None = None  # the narrowest span known to hold more than one read shows
    best: list[dict[str, Any]] = []
    for _ in range(_MOST_READS):
        begin = end - span if start is None else max(start, end - span)
        found = await read({**filters, "since": f"{begin:.6f}", "until": f"{end:.6f}", "limit": str(MAX_LIMIT)})
        if len(found) >= MAX_LIMIT:  # a full read: the window's newest events are not in it
            too_many = span
        else:
            best = found
            if len(found) >= count or (start is not None and begin <= start) or span >= _FOREVER_S:
                break
            too_few = span
        if too_many is None:
            span *= _GROWTH
        elif too_few is None:
            span /= _GROWTH
        elif too_many / too_few < 1.01:
            break
        else:
            span = (too_few * too_many) ** 0.5
    return best[::-1][:count]


def row(event: Mapping[str, Any]) -> dict[str, Any]:
    """What the console shows of one event."""
    return {
        "id": event.get("id"),
        "timestamp": event.get("timestamp"),
        "time": utc_time(event.get("timestamp")),
        "result": event.get("result") or "",
        "user": event.get("user_id") or "",
        "client": event.get("client_id") or "",
        "operation": event.get("operation") or event.get("http_method") or "",
        "target": event.get("tool_executed") or event.get("prompt") or event.get("resource_accessed") or "",
        "reason": event.get("reason") or "",
        "status": event.get("status") or "",
        "approval_id": event.get("approval_id") or "",
    }
