"""What an upstream offers, asked by the gateway itself: `list_tools(config, upstream)`.

Owns a small MCP client that speaks through the gateway's own hop to the upstream (`UpstreamProxy` for an HTTP
upstream, with the headers and token the config gives it; `StdioUpstream` for a program), so that an operator
can see an upstream's tools, and lint a policy against them, with no client token and no gateway running. It
opens a legacy session (initialize, initialized), pages through `tools/list`, and ends the session.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, Any

import orjson

from gateway.exceptions import GatewayError
from gateway.types import ASGIMessage, RequestState

if TYPE_CHECKING:
    from gateway.config import Config, Upstream

_PROTOCOL = "2025-06-18"
_MAX_PAGES = 100


class ListingFailed(GatewayError):
    """The upstream could not be asked, or its answer was not a tool list."""


async def list_tools(config: Config, upstream: Upstream) -> list[dict[str, Any]]:
    """Every tool `upstream` lists, as it lists them; ListingFailed with the reason when it cannot be asked,
    ConfigError when `config` was loaded without the upstreams' credentials."""
    from gateway.metrics import Metrics
    from gateway.oauth.upstream import UpstreamCredential
    from gateway.proxy import UpstreamProxy
    from gateway.stdio.upstream import StdioUpstream

    config.require_upstream_secrets()  # the upstream is asked with them
    app: UpstreamProxy | StdioUpstream
    if upstream.url is not None:
        credential = (UpstreamCredential(upstream.name, upstream.url, upstream.oauth)
                      if upstream.oauth is not None else None)
        app = UpstreamProxy(upstream, config.limits, config.public_url, credential)
    elif upstream.command is not None:
        app = StdioUpstream(upstream, config.limits, config.sessions, Metrics())
    else:
        raise ListingFailed(f"upstream {upstream.name} has neither url nor command")
    client = _Client(app, upstream.path)
    try:
        await client.request("initialize", {"protocolVersion": _PROTOCOL, "capabilities": {},
                                            "clientInfo": {"name": "mcp-gateway", "version": "lint"}})
        await client.notify("notifications/initialized")
        tools: list[dict[str, Any]] = []
        cursor = None
        for _ in range(_MAX_PAGES):
            page = await client.request("tools/list", {"cursor": cursor} if cursor else {})
            listed = page.get("tools")
            if not isinstance(listed, list):
                raise ListingFailed("the tools/list answer holds no tools array")
            tools += [tool for tool in listed if isinstance(tool, dict)]
            cursor = page.get("nextCursor")
            if not isinstance(cursor, str):
                return tools
        raise ListingFailed(f"more than {_MAX_PAGES} pages of tools")
    finally:
        await client.end()
        await app.close()


class _Client:
    """JSON-RPC over one ASGI app, as a client sees it: the session id it was given, answers as JSON or SSE."""

    def __init__(self, app: Any, path: str) -> None:
        self._app, self._path = app, path
        self._session: bytes | None = None
        self._ids = itertools.count(1)
        self._state = RequestState(caller="mcp-gateway lint")  # a stdio upstream runs a process for this caller

    async def _exchange(self, method: str, body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        headers = [(b"content-type", b"application/json"), (b"accept", b"application/json, text/event-stream"),
                   (b"mcp-protocol-version", _PROTOCOL.encode())]
        if self._session is not None:
            headers.append((b"mcp-session-id", self._session))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": self._path, "raw_path": self._path.encode(), "query_string": b"",
                 "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
                 "mcp_gateway": self._state}
        sent = False
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def receive() -> ASGIMessage:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # this client stays until the answer is whole
            return {"type": "http.disconnect"}

        async def send(message: ASGIMessage) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self._app(scope, receive, send)
        answer_headers = {n.lower(): v for n, v in started.get("headers", [])}
        return int(started.get("status", 502)), answer_headers, b"".join(chunks)

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        request_id = next(self._ids)
        payload = orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        status, headers, body = await self._exchange("POST", payload)
        if b"mcp-session-id" in headers:
            self._session = headers[b"mcp-session-id"]
        if status != 200:
            raise ListingFailed(f"{method}: the upstream answered HTTP {status}: {body[:200]!r}")
        for message in _messages(headers.get(b"content-type", b""), body):
            if message.get("id") == request_id:
                if "error" in message:
                    raise ListingFailed(f"{method}: {message['error']}")
                result = message.get("result")
                if isinstance(result, dict):
                    return result
        raise ListingFailed(f"{method}: no answer in what the upstream sent")

    async def notify(self, method: str) -> None:
        await self._exchange("POST", orjson.dumps({"jsonrpc": "2.0", "method": method}))

    async def end(self) -> None:
        if self._session is not None:
            try:
                await self._exchange("DELETE", b"")
            except Exception:  # ending is a courtesy: the session lapses on its own
                return


def _messages(content_type: bytes, body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an answer: a JSON body, or the `data:` of each SSE event."""
    try:
        if content_type.startswith(b"text/event-stream"):
            events = body.replace(b"\r\n", b"\n").split(b"\n\n")
            datas = [b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
                     for event in events]
            parsed = [orjson.loads(data) for data in datas if data.strip()]
        else:
            parsed = [orjson.loads(body)]
    except orjson.JSONDecodeError as exc:
        raise ListingFailed(f"the upstream's answer is not JSON: {exc}") from None
    flat = [m for item in parsed for m in (item if isinstance(item, list) else [item])]
    return [m for m in flat if isinstance(m, dict)]
