"""The edge guards: what is refused about a request before anyone asks who sent it.

Owns: the HTTP methods an MCP endpoint accepts, the headers a second copy of
which is refused, the Origin check (DNS-rebinding protection), the headers that
never reach the upstream because they end at this hop, and the content type a
POST must carry. No I/O: a refusal is raised as `GatewayRefusal`; what the
headers say about the session and the protocol version is noted on the exchange.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway import errors
from gateway.mcp import SESSION_HEADER
from gateway.mcp_headers import PROTOCOL_VERSION_HEADER
from gateway.types import ASGIScope, connection_options, first_value

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.config import Config
    from gateway.exchange import Exchange

# Headers the gateway reads to decide: a second copy is refused, since a reader taking the first and one taking
# the last would act on different values.
_SINGLE_HEADERS = ("content-type", "mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name", "origin",
                   "last-event-id")


def check_edge(ex: Exchange, headers: Mapping[str, list[str]], config: Config) -> None:
    """Refuse what no principal may send; note the session id and the protocol version the headers name."""
    if ex.http_method not in ("POST", "GET", "DELETE"):
        raise errors.GatewayRefusal(errors.METHOD_NOT_ALLOWED, ex.http_method)
    for name in _SINGLE_HEADERS:
        if len(headers.get(name, ())) > 1:  # a first-copy reader and a last-copy reader would disagree
            raise errors.GatewayRefusal(errors.INVALID_REQUEST, f"{name} header appears more than once",
                                        reason=f"repeated_header:{name}")
    origins = headers.get("origin")
    if origins:
        origin = origins[0].rstrip("/")
        if origin.lower() != config.public_origin and origin not in config.allowed_origins:
            raise errors.GatewayRefusal(errors.FORBIDDEN_ORIGIN, reason=f"origin:{origin}")
    ex.session_id = first_value(headers, SESSION_HEADER)
    ex.protocol_version = first_value(headers, PROTOCOL_VERSION_HEADER)


def check_body(headers: Mapping[str, list[str]], limit: int) -> None:
    """A POST carries JSON, and does not announce more than `limit` bytes of it."""
    content_type = (first_value(headers, "content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise errors.GatewayRefusal(errors.BAD_CONTENT_TYPE, reason=f"content-type:{content_type or 'none'}")
    declared = first_value(headers, "content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.GatewayRefusal(errors.PAYLOAD_TOO_LARGE, f"limit is {limit} bytes")


def as_forwarded(scope: ASGIScope) -> ASGIScope:
    """The request with only the headers an upstream may receive, so that what the gateway reads is what the
    upstream reads: not those the Connection header names (RFC 9110 7.6.1: they end at this hop), and not
    names with an underscore (which some servers read as a hyphen: `mcp_session_id` as `Mcp-Session-Id`)."""
    headers = scope["headers"]
    nominated = connection_options(headers)
    kept = [(n, v) for n, v in headers if b"_" not in n and n not in nominated]
    return scope if len(kept) == len(headers) else {**scope, "headers": kept}

