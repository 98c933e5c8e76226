"""The redirect receiver of a native client (RFC 8252 7.3): one listening socket on 127.0.0.1, a random port.

Owns taking the authorization redirect: it listens only on the loopback
address, reads at most one small request head per connection, takes the first
`GET /callback` whose query it can read, and answers the browser with a short
page (never echoing what it received). Anything else (a favicon, a probe) gets
a 404 and the receiver keeps waiting. A parameter given twice makes the
redirect unreadable: the flow fails rather than pick one copy.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from urllib.parse import parse_qsl, urlsplit

from gateway.oauth.metadata import OAuthClientError

_PATH = "/callback"
_MAX_HEAD = 8 * 1024
_PAGE = (b"<!doctype html><meta charset=utf-8><title>mcp-gateway</title>"
         b"<p>%s You can close this window and return to your application.</p>")


class RedirectReceiver:
    """`async with RedirectReceiver() as receiver:` then `receiver.redirect_uri`, then `await receiver.wait(t)`."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._arrived: asyncio.Future[dict[str, str]] | None = None
        self.redirect_uri = ""

    async def __aenter__(self) -> RedirectReceiver:
        self._arrived = asyncio.get_running_loop().create_future()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.redirect_uri = f"http://127.0.0.1:{port}{_PATH}"
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def wait(self, timeout: float) -> dict[str, str]:
        """The redirect's query parameters, or OAuthClientError when none came within `timeout` seconds."""
        assert self._arrived is not None, "use RedirectReceiver in `async with`"
        try:
            return await asyncio.wait_for(asyncio.shield(self._arrived), timeout)
        except TimeoutError:
            raise OAuthClientError(f"no authorization arrived at {self.redirect_uri} within {timeout:.0f} s "
                                   "(was the browser page completed?)") from None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        status, message = self._take(head)
        body = _PAGE % message
        writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: %d\r\n"
                     b"cache-control: no-store\r\nconnection: close\r\n\r\n%s"
                     % (status, b"OK" if status == 200 else b"Not Found", len(body), body))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _take(self, head: bytes) -> tuple[int, bytes]:
        assert self._arrived is not None
        if len(head) > _MAX_HEAD:
            return 404, b"Request too large."
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"GET":
            return 404, b"Not found."
        try:
            target = urlsplit(parts[1].decode("latin-1"))
        except ValueError:
            return 404, b"Not found."
        if target.path != _PATH or self._arrived.done():
            return 404, b"Not found."
        pairs = parse_qsl(target.query, keep_blank_values=True)
        params = dict(pairs)
        if len(params) != len(pairs):
            self._arrived.set_exception(OAuthClientError("the authorization redirect repeats a parameter: refused"))
            return 200, b"The authorization could not be read."
        self._arrived.set_result(params)
        return 200, b"Authorization received."
