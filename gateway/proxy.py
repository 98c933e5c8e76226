"""The forwarding hop: an ASGI app that sends each request to one upstream MCP server and streams the answer back.

Owns: the upstream HTTP client (aiohttp, one pooled session per upstream,
created on the running loop), which request headers go upstream and which
response headers come back (hop-by-hop dropped; the client's `Authorization`
and cookies never sent; `Host` the upstream's own; `X-Forwarded-*` added;
configured upstream headers injected), timeouts, and turning every upstream
failure into a 502/504 with a JSON-RPC error body instead of a traceback.

It makes no security decision: the middleware in front of it has already
authenticated, classified and decided. It reads the request ids the
middleware left in `scope["mcp_gateway"]` only to address its error bodies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

import aiohttp

from gateway.config import Limits, Upstream
from gateway.errors import UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE, Refusal, error_body
from gateway.types import ASGIReceive, ASGIScope, ASGISend, RequestState, send_json

log = logging.getLogger("gateway.proxy")

# RFC 9110 7.6.1 connection-specific headers, plus what the gateway itself sets or strips.
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade",
})
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"authorization", b"cookie", b"content-length", b"accept-encoding",
                                b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
_NOT_RETURNED = _HOP_BY_HOP | {b"set-cookie", b"server", b"date"}


class UpstreamProxy:
    """ASGI app forwarding every HTTP request it gets to `upstream.url`.

    Args:
        upstream: the upstream's config (url and headers to inject).
        limits: `upstream_connect_timeout_s` bounds connecting; `upstream_timeout_s`
            bounds the longest silence while waiting for or reading the answer.
        public_url: the gateway's public URL, for `X-Forwarded-Host`/`-Proto`.
    """

    def __init__(self, upstream: Upstream, limits: Limits, public_url: str) -> None:
        if upstream.url is None:
            raise ValueError(f"upstream {upstream.name!r} has no url to forward to")
        self.upstream = upstream
        self._url = upstream.url
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=limits.upstream_connect_timeout_s, sock_read=limits.upstream_timeout_s
        )
        public = urlsplit(public_url)
        self._forwarded = [
            (b"x-forwarded-proto", public.scheme.encode()),
            (b"x-forwarded-host", public.netloc.encode()),
        ]
        self._inject = [(k.lower().encode(), v.encode()) for k, v in upstream.headers.items()]
        self._injected_names = {name for name, _ in self._inject}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _request_headers(self, scope: ASGIScope) -> list[tuple[str, str]]:
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope["headers"]
            if name not in _NOT_FORWARDED and name not in self._injected_names
        ]
        client = scope.get("client")
        prior = [v.decode("latin-1") for n, v in scope["headers"] if n == b"x-forwarded-for"]
        chain = ", ".join([*prior, client[0]]) if client else ", ".join(prior)
        if chain:
            headers.append(("x-forwarded-for", chain))
        headers.extend((n.decode(), v.decode("latin-1")) for n, v in self._forwarded)
        headers.extend((n.decode(), v.decode("latin-1")) for n, v in self._inject)
        headers.append(("accept-encoding", "identity"))
        return headers

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        # A client that goes away must not leave an upstream stream (a legacy GET, a long SSE answer) being read.
        forward = asyncio.ensure_future(self._forward(scope, body, send))
        disconnect = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((forward, disconnect), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (forward, disconnect):
                if not task.done():
                    task.cancel()
            await asyncio.gather(forward, disconnect, return_exceptions=True)
        if forward.done() and not forward.cancelled() and forward.exception() is not None:
            raise forward.exception()  # type: ignore[misc]

    async def _forward(self, scope: ASGIScope, body: bytes, send: ASGISend) -> None:
        state: RequestState | None = scope.get("mcp_gateway")
        url = self._url
        if scope.get("query_string"):
            url = f"{url}{'&' if '?' in url else '?'}{scope['query_string'].decode('latin-1')}"
        started = False
        try:
            async with self._client().request(
                scope["method"], url, data=body or None, headers=self._request_headers(scope), allow_redirects=False
            ) as response:
                await send({
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": list(_response_headers(response.raw_headers)),
                })
                started = True
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            await self._fail(send, state, started, UPSTREAM_TIMEOUT, "timeout")
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("upstream %s failed: %s", self.upstream.name, exc)
            await self._fail(send, state, started, UPSTREAM_UNAVAILABLE, _error_kind(exc, started))

    async def _fail(
        self, send: ASGISend, state: RequestState | None, started: bool, refusal: Refusal, kind: str
    ) -> None:
        if state is not None:
            state.upstream_error = kind
        if started:
            # Status already sent: end the body; the middleware tells the client what happened, per message.
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        ids = state.request_ids if state is not None else ()
        if len(ids) > 1:
            payload = b"[" + b",".join(error_body(refusal, i, kind) for i in ids) + b"]"
        else:
            payload = error_body(refusal, ids[0] if ids else None, kind)
        await send_json(send, refusal.http_status, payload)


def _error_kind(exc: BaseException, started: bool) -> str:
    if started:
        return "reset"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected"
    return "protocol"


def _response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Iterable[tuple[bytes, bytes]]:
    for name, value in raw:
        lowered = name.lower()
        if lowered not in _NOT_RETURNED:
            yield lowered, value


async def _until_disconnect(receive: ASGIReceive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(receive: ASGIReceive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
