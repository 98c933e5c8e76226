"""The forwarding hop: an ASGI app that sends each request to one upstream MCP server and streams the answer back.

Owns: the upstream HTTP client (`upstream_http`, one pool of keep-alive
connections per upstream), which request headers go upstream and which
response headers come back (hop-by-hop dropped; the client's `Authorization`
and cookies never sent; `Host` the upstream's own; `X-Forwarded-*` added;
configured upstream headers injected, or the token `oauth.upstream` obtains
for an upstream that requires its own), timeouts, and turning every upstream
failure into a 502/504 with a JSON-RPC error body instead of a traceback. An
upstream's 401 to the gateway's own token drops that token and fails the call
(a POST is never replayed); its challenges never reach the client, who could
not answer them.

It makes no security decision: the middleware in front of it has already
authenticated, classified and decided. It reads the request ids the
middleware left in `scope["mcp_gateway"]` only to address its error bodies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from gateway.config import Limits, Upstream
from gateway.errors import UPSTREAM_CREDENTIAL, UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE, Refusal, error_body
from gateway.exchange import read_body
from gateway.oauth.metadata import OAuthClientError
from gateway.oauth.upstream import UpstreamCredential
from gateway.types import ASGIReceive, ASGIScope, ASGISend, RequestState, connection_options, send_json
from gateway.upstream_http import UpstreamError, UpstreamPool

log = logging.getLogger("gateway.proxy")

# RFC 9110 7.6.1 connection-specific headers, plus what the gateway itself sets or strips.
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade",
})
# `expect` too: the gateway's own server answers a client's 100-continue; the upstream gets the whole body at once.
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"authorization", b"cookie", b"content-length", b"accept-encoding",
                                b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                                b"forwarded"}
_NOT_RETURNED = _HOP_BY_HOP | {b"set-cookie", b"server", b"date"}
_WHOLE_BYTES = 64 * 1024  # answers declaring at most this length are read whole before the client sees them


class UpstreamProxy:
    """ASGI app forwarding every HTTP request it gets to `upstream.url`.

    Args:
        upstream: the upstream's config (url and headers to inject).
        limits: `upstream_connect_timeout_s` bounds connecting; `upstream_timeout_s`
            bounds the longest silence while waiting for or reading the answer.
        public_url: the gateway's public URL, for `X-Forwarded-Host`/`-Proto`.
        credential: the upstream's own token, when `upstream.oauth` is set.
    """

    def __init__(self, upstream: Upstream, limits: Limits, public_url: str,
                 credential: UpstreamCredential | None = None) -> None:
        if upstream.url is None:
            raise ValueError(f"upstream {upstream.name!r} has no url to forward to")
        self.upstream = upstream
        target = urlsplit(upstream.url)
        self._path = target.path or "/"
        self._query = target.query
        self._pool = UpstreamPool(upstream.url, connect_timeout=limits.upstream_connect_timeout_s,
                                  read_timeout=limits.upstream_timeout_s,
                                  max_connections=limits.upstream_max_connections, tls=upstream.tls)
        if upstream.tls is not None and not upstream.tls.verify:
            log.warning("upstream %s: its TLS certificate is not verified (tls.verify: false)", upstream.name)
        self._credential = credential
        self._not_returned = _NOT_RETURNED | ({b"www-authenticate"} if credential is not None else set())
        public = urlsplit(public_url)
        self._inject = [(k.lower().encode(), v.encode()) for k, v in upstream.headers.items()]
        self._injected_names = {name for name, _ in self._inject}
        # Added to every request after the client's own headers: forwarding facts, then the configured ones.
        self._added = [
            (b"x-forwarded-proto", public.scheme.encode()),
            (b"x-forwarded-host", public.netloc.encode()),
            *self._inject,
            (b"accept-encoding", b"identity"),
        ]

    async def close(self) -> None:
        self._pool.close()
        if self._credential is not None:
            await self._credential.close()

    def _request_headers(self, scope: ASGIScope) -> list[tuple[bytes, bytes]]:
        headers = [
            (name, value) for name, value in scope["headers"]
            if name not in _NOT_FORWARDED and name not in self._injected_names
        ]
        client = scope.get("client")
        chain = [v for n, v in scope["headers"] if n == b"x-forwarded-for"]
        if client:
            chain.append(str(client[0]).encode("latin-1"))
        if chain:
            headers.append((b"x-forwarded-for", b", ".join(chain)))
        headers += self._added
        return headers

    def _target(self, scope: ASGIScope) -> str:
        query = "&".join(q for q in (self._query, scope.get("query_string", b"").decode("latin-1")) if q)
        return f"{self._path}?{query}" if query else self._path

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)  # replayed whole by the middleware, within its limits
        # A client that goes away must not leave an upstream stream (a legacy GET, a long SSE answer) being
        # read: a watcher cancels this task when the client disconnects. One task per request, not two.
        current = asyncio.current_task()
        assert current is not None
        watcher = asyncio.get_running_loop().create_task(_until_disconnect(receive))
        finished = False

        def client_gone(task: asyncio.Task[None]) -> None:
            if not finished and not task.cancelled() and task.exception() is None:
                current.cancel()

        watcher.add_done_callback(client_gone)
        try:
            await self._forward(scope, body, send)
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # cancelled from outside, not by the client going away
            current.uncancel()
        finally:
            finished = True
            watcher.cancel()

    async def _forward(self, scope: ASGIScope, body: bytes, send: ASGISend) -> None:
        state: RequestState | None = scope.get("mcp_gateway")
        started = False
        headers = self._request_headers(scope)
        authorization = None
        if self._credential is not None:
            try:
                authorization = await self._credential.authorization(state.caller_token if state else None)
            except OAuthClientError:
                await self._fail(send, state, False, UPSTREAM_CREDENTIAL, "credential")
                return
            headers.append((b"authorization", authorization.encode()))
        try:
            response = await self._pool.request(scope["method"], self._target(scope), headers, body)
            try:
                if authorization is not None and self._credential is not None and response.status == 401:
                    self._credential.drop(authorization)
                    await self._fail(send, state, False, UPSTREAM_CREDENTIAL, "unauthorized")
                    return
                start = {"type": "http.response.start", "status": response.status,
                         "headers": list(_response_headers(response.headers, self._not_returned))}
                if _small(response.headers):
                    # Read whole before anything is sent: a small answer reaches the client complete and checked
                    # (a byte past its length fails it), or as a clean error, never cut half-way.
                    whole = b"".join([chunk async for chunk, _ in response.body()])
                    await send(start)
                    started = True
                    await send({"type": "http.response.body", "body": whole, "more_body": False})
                else:
                    await send(start)
                    started = True
                    async for chunk, more in response.body():
                        await send({"type": "http.response.body", "body": chunk, "more_body": more})
            finally:
                response.release()
        except TimeoutError:
            await self._fail(send, state, started, UPSTREAM_TIMEOUT, "timeout")
        except UpstreamError as exc:
            log.warning("upstream %s failed: %s", self.upstream.name, exc)
            await self._fail(send, state, started, UPSTREAM_UNAVAILABLE, "reset" if started else exc.kind)

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


def _small(headers: list[tuple[bytes, bytes]]) -> bool:
    """An answer whose declared length is at most _WHOLE_BYTES."""
    length = next((v for n, v in headers if n.lower() == b"content-length"), None)
    return length is not None and length.strip().isdigit() and int(length) <= _WHOLE_BYTES


def _response_headers(raw: list[tuple[bytes, bytes]], dropped: frozenset[bytes] | set[bytes]
                      ) -> Iterable[tuple[bytes, bytes]]:
    """The upstream's headers the client gets: not `dropped` (hop-by-hop), not named in its Connection header."""
    nominated = connection_options(raw)
    for name, value in raw:
        lowered = name.lower()
        if lowered not in dropped and lowered not in nominated:
            yield lowered, value



async def _until_disconnect(receive: ASGIReceive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
