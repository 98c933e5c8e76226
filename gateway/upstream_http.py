"""A lean HTTP/1.1 client for the upstream hop: pooled keep-alive connections, streamed answers.

Owns the connection to one upstream origin: a pool of idle keep-alive
connections, writing a request (head and body in one write), parsing the
answer with httptools (the C parser uvicorn uses), and handing the body over
chunk by chunk with flow control (reading from the upstream pauses while the
client is slower), and timeouts (connecting, and the longest silence).

Why not aiohttp: on this workload its request machinery was the largest
single cost of the forwarding hop (about a sixth of the gateway's CPU per
request); the hop needs none of what it offers beyond HTTP/1.1 framing.
Errors are `UpstreamError(kind)`: connect, disconnected (closed before an
answer), reset (closed mid-answer), protocol (not HTTP), or `TimeoutError`.
"""

from __future__ import annotations

import asyncio
import collections
import select
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from typing import cast
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 256 * 1024  # buffered answer bytes above which reading from the upstream pauses
# An idle connection older than this is closed, not reused: servers close idle keep-alive connections (gunicorn
# after 2 s, uvicorn and Node after 5 s), and a request written just as the server closes is lost.
_IDLE_S = 1.0


class UpstreamError(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class _Connection(asyncio.Protocol):
    """One TCP connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._fd = -1
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None

    # ---- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._fd = transport.get_extra_info("socket").fileno()

    def quiet(self) -> bool:
        """True while the idle connection has nothing to read. The upstream closing it (EOF) or sending what
        nobody asked for both make it readable; the loop may not have seen either yet, and a request written
        to it then would be lost. One poll() call, made only when a pooled connection is about to be reused."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return not poller.poll(0)

    def data_received(self, data: bytes) -> None:
        if self.complete:  # bytes on an idle connection belong to no request: it cannot be trusted again
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", str(exc)))
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> None:
        # Marked now, while the loop polls: connection_lost comes a turn later, and a request picking this
        # connection from the pool in between would be written to a server that has already gone.
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and exc is None and not self._framed():
            self.complete = True  # a body delimited by the connection closing (no length, not chunked)
            self._wake()
        if not self.complete:
            self._fail(UpstreamError("reset" if self.headers_done else "disconnected", str(exc or "closed")))

    def _framed(self) -> bool:
        return any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)

    # ---- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()  # asked now: the parser forgets once the message ends
        self.complete = True
        self._wake()

    # ---- the request side ------------------------------------------------------------------

    def start(self, request: bytes) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.headers, self.headers_done, self.complete, self.keep_alive, self.error = [], False, False, False, None
        self._chunks.clear()
        self._buffered = 0
        assert self.transport is not None
        self.transport.write(request)

    @property
    def status(self) -> int:
        return int(self._parser.get_status_code())

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    async def wait(self, timeout: float) -> None:
        """Until something new arrives (headers, a chunk, the end) or the connection fails."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._timed_out, self._waiter)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self) -> bytes:
        data = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def has_body(self) -> bool:
        return bool(self._chunks)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        self.error = self.error or error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self.error)

    @staticmethod
    def _timed_out(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())


class Response:
    """An upstream answer whose head has arrived; iterate `body()` for the rest."""

    def __init__(self, pool: UpstreamPool, connection: _Connection) -> None:
        self._pool = pool
        self._connection = connection
        self.status = connection.status
        self.headers = connection.headers

    async def body(self) -> AsyncIterator[tuple[bytes, bool]]:
        """(chunk, more) pairs; the last has more=False (and may be empty)."""
        connection = self._connection
        while True:
            if connection.has_body:
                chunk = connection.take()
                done = connection.complete and not connection.has_body  # decided before yielding: more may come
                yield chunk, not done
                if done:
                    return
            elif connection.complete:
                yield b"", False
                return
            else:
                await connection.wait(self._pool.read_timeout)

    def release(self) -> None:
        """Done with this answer: a fully read keep-alive connection goes back to the pool, any other closes."""
        self._pool.release(self._connection)


class UpstreamPool:
    """Keep-alive connections to one upstream origin (`http://host:port`)."""

    def __init__(self, url: str, *, connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        # One TLS context per upstream, made once: never per request.
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.authority = parts.netloc.encode("latin-1")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[_Connection] = []

    async def request(self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
                      ) -> Response:
        """Send one request and wait for the head of its answer."""
        head = [f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"), self.authority, b"\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        head.append(body)
        connection = await self._connection()
        try:
            connection.start(b"".join(head))
            while not connection.headers_done:
                await connection.wait(self.read_timeout)
        except BaseException:
            connection.close()
            raise
        return Response(self, connection)

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < _IDLE_S and connection.quiet():
                return connection
            connection.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(_Connection, self.host, self.port, ssl=self._ssl)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError("connect", str(exc)) from None
        return protocol

    def release(self, connection: _Connection) -> None:
        if connection.reusable:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
