"""ASGI type aliases and the per-request state the middleware shares with the forwarding hop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from gateway.jsonrpc import JsonRpcId

ASGIScope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[ASGIMessage]]
ASGISend = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, ASGIReceive, ASGISend], Awaitable[None]]


@dataclass(slots=True)
class RequestState:
    """Set by the middleware in `scope["mcp_gateway"]`: the trusted channel between the gateway and the
    forwarding hop. The hop reports upstream failures into it, and a stdio hop the process that served."""

    request_ids: tuple[JsonRpcId, ...] = ()
    caller: str | None = None  # who is asking (the principal's identity, joined), for a hop that isolates callers
    upstream_error: str | None = None
    upstream_process: int | None = None
    # the caller's validated token, set only for an upstream whose oauth grant exchanges it (RFC 8693)
    caller_token: str | None = field(default=None, repr=False)


async def send_json(send: ASGISend, status: int, payload: bytes,
                    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A whole answer: a JSON body with its length (or no body at all), plus `headers`."""
    framing = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*(framing if payload else []),
                                                                                *headers]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def header_values(scope: Mapping[str, Any]) -> dict[str, list[str]]:
    """Request headers by lowercase name, every value kept (repeats matter for routing headers)."""
    out: dict[str, list[str]] = {}
    for name, value in scope["headers"]:
        out.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return out


def first_value(headers: Mapping[str, list[str]], name: str) -> str | None:
    """The first value of a header in `header_values` form (repeats of the headers that decide are refused)."""
    values = headers.get(name)
    return values[0] if values else None


def connection_options(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names a message's Connection header lists (RFC 9110 7.6.1): they are for this hop only."""
    found: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            found.update(token.strip().lower() for token in value.split(b","))
    return frozenset(found - {b""})
