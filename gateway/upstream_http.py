"""A lean, strict HTTP/1.1 client for the upstream hop: pooled keep-alive connections, streamed answers.

Owns the connections to one upstream origin: a bounded pool of idle
keep-alive connections, writing a request (head and body in one write),
parsing the answer with httptools (the C parser uvicorn uses) under the rules
below, and handing the body over chunk by chunk with flow control (reading
from the upstream pauses while the client is slower) and timeouts (connecting,
waiting for a free connection, and the longest silence).

It is security code: an answer delivered to a request other than the one it
answers is a leak between callers. So it accepts no more than h11 would:

- 1xx answers (100 Continue, 103 Early Hints) are skipped, at most 8 of them,
  and the final answer is read after them; 101 (nobody asked to switch
  protocols) is a protocol error;
- the head of an answer is bounded (16 KiB, h11's default), interim heads included;
- framing comes from one Content-Length or from `Transfer-Encoding: chunked`,
  never both, never another transfer coding; duplicate lengths, folded header
  lines (obs-fold), bare LF line ends and bytes that are not HTTP are refused
  (httptools' strict defaults, pinned by the tests against h11);
- a byte that arrives outside an answer (after its end, or on an idle
  connection) belongs to no request: the answer it follows fails if it is
  still being read, and the connection is closed, never pooled;
- a connection is pooled only when its answer was read to the end, asked to be
  kept alive and broke no rule; anything else closes it.

A request written to a pooled connection that the upstream closed as it went
out (no byte of an answer arrived) is written once more on a fresh connection:
a server ending an idle keep-alive connection never read it (Go's net/http
retries in the same case). Any other failure is the caller's.

Errors are `UpstreamError(kind)`: connect, busy (no free connection within the
connect timeout), disconnected (closed before an answer), reset (closed
mid-answer), protocol (not HTTP/1.1 as above), or `TimeoutError`.
"""

from __future__ import annotations

import asyncio
import collections
import select
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import httptools

from gateway.exceptions import GatewayError

if TYPE_CHECKING:
    from gateway.config_upstream import UpstreamTls

_HIGH_WATER = 256 * 1024  # buffered answer bytes above which reading from the upstream pauses
# An idle connection older than this is closed, not reused: servers close idle keep-alive connections (gunicorn
# after 2 s, uvicorn and Node after 5 s), and a request written just as the server closes is lost.
_IDLE_S = 1.0
MAX_HEAD_BYTES = 16 * 1024  # status line and headers of an answer, interim answers included (h11's default bound)
_MAX_INTERIM = 8  # 1xx answers skipped before the final one


class UpstreamError(GatewayError):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class _Violation(GatewayError):
    """Raised inside a parser callback: the answer breaks a rule of this client (see the module docstring)."""


class _Connection(asyncio.Protocol):
    """One TCP connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._fd = -1
        self.closed = False
        self.idle_since = 0.0
        self.reused = False  # taken from the pool for the current request
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
        self.answering = False  # a request was written and its answer has not ended
        self.received = 0  # bytes of the current answer received so far
        self._head_bytes = 0
        self._interim = 0
        self._in_interim = False

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
        if not self.answering:  # bytes on an idle connection belong to no request: it cannot be trusted again
            self.close()
            return
        self.received += len(data)
        try:
            self._parser.feed_data(data)
            if not self.headers_done and self.received > MAX_HEAD_BYTES:
                raise _Violation(f"an answer head over {MAX_HEAD_BYTES} bytes")
        except Exception as exc:  # httptools' HttpParserError or HttpParserUpgrade, or a callback's _Violation
            reason = exc if isinstance(exc, _Violation) else exc.__context__ or exc
            self._fail(UpstreamError("protocol", str(reason) or type(reason).__name__))
            self.close()

    def eof_received(self) -> None:
        # Marked now, while the loop polls: connection_lost comes a turn later, and a request picking this
        # connection from the pool in between would be written to a server that has already gone.
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answering and self.headers_done and exc is None and self.error is None and not self._framed():
            self._message_ended(keep_alive=False)  # a body delimited by the connection closing (no length)
        if self.answering:
            self._fail(UpstreamError("reset" if self.headers_done else "disconnected", str(exc or "closed")))

    def _framed(self) -> bool:
        return any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)

    # ---- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Violation("bytes after the end of the answer")

    def on_status(self, status: bytes) -> None:
        self._head_bytes += len(status) + 16

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Violation(f"an answer head (trailers included) over {MAX_HEAD_BYTES} bytes")
        if not self.headers_done:  # after the head: a chunked body's trailer fields, which are not passed on
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        codings = [v for n, v in self.headers if n.lower() == b"transfer-encoding"]
        if 100 <= status < 200:
            if status == 101:
                raise _Violation("101 Switching Protocols, and no upgrade was asked for")
            if codings or self._framed():
                raise _Violation("an interim (1xx) answer with framing headers")  # it has no body to frame
            self._interim += 1
            if self._interim > _MAX_INTERIM:
                raise _Violation(f"more than {_MAX_INTERIM} interim (1xx) answers")
            self._in_interim = True
            return
        if codings and (len(codings) > 1 or codings[0].strip().lower() != b"chunked"):
            raise _Violation("a transfer coding other than chunked")
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
        if self._in_interim:  # a 1xx answer ended: the final one follows on the same connection
            self._in_interim = False
            self.headers = []
            return
        self._message_ended(self._parser.should_keep_alive())  # asked now: the parser forgets once it ends

    def _message_ended(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.complete = True
        self.answering = False
        self._wake()

    # ---- the request side ------------------------------------------------------------------

    def start(self, request: bytes) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.headers, self.headers_done, self.complete, self.keep_alive, self.error = [], False, False, False, None
        self.answering, self.received, self._head_bytes, self._interim, self._in_interim = True, 0, 0, 0, False
        self._chunks.clear()
        self._buffered = 0
        assert self.transport is not None
        self.transport.write(request)

    @property
    def status(self) -> int:
        return int(self._parser.get_status_code())

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

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
        self.answering = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self.error)

    @staticmethod
    def _timed_out(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())


class Response:
    """An upstream answer whose head has arrived; iterate `body()` for the rest, then `release()` it once."""

    def __init__(self, pool: UpstreamPool, connection: _Connection) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.headers = connection.headers

    async def body(self) -> AsyncIterator[tuple[bytes, bool]]:
        """(chunk, more) pairs; the last has more=False (and may be empty). A broken answer raises before its
        last chunk is handed over, so a caller never takes it for a whole one."""
        connection = self._connection
        assert connection is not None
        while True:
            if connection.error is not None:
                raise connection.error
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
        if self._connection is not None:
            self._pool.release(self._connection)
            self._connection = None


def tls_context(tls: UpstreamTls | None) -> ssl.SSLContext:
    """The TLS context for an https upstream: the system's CAs (or `tls.ca_file`'s), the client certificate if
    one is configured, verification off only if `tls.verify` is false."""
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls and tls.ca_file else None)
    if tls is not None and tls.client_cert is not None and tls.client_key is not None:
        context.load_cert_chain(tls.client_cert, tls.client_key)
    if tls is not None and not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class UpstreamPool:
    """Keep-alive connections to one upstream origin (`http://host:port`), at most `max_connections` open."""

    def __init__(self, url: str, *, connect_timeout: float, read_timeout: float, max_connections: int = 256,
                 tls: UpstreamTls | None = None) -> None:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in an upstream URL are never sent: configure them as headers")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        # One TLS context per upstream, made once: never per request.
        self._ssl = tls_context(tls) if parts.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal keeps its brackets
        self.authority = host.encode("idna") + (b":%d" % parts.port if parts.port is not None else b"")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections)  # one per open connection in use
        self._idle: list[_Connection] = []

    async def request(self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
                      ) -> Response:
        """Send one request and wait for the head of its (final) answer."""
        head = [f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"), self.authority, b"\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        head.append(body)
        request = b"".join(head)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamError("busy", f"all {self.max_connections} connections are in use") from None
        try:
            connection = await self._answered(request)
        except BaseException:
            self._slots.release()
            raise
        return Response(self, connection)

    async def _answered(self, request: bytes) -> _Connection:
        """The connection on which `request` was written and the head of its final answer has arrived."""
        connection = await self._connection()
        try:
            await self._head_of_answer(connection, request)
        except UpstreamError as failed:
            if not (connection.reused and failed.kind == "disconnected" and connection.received == 0):
                raise
            # The upstream closed the pooled connection as the request went out, so it never read it: once
            # more, on a fresh connection (not another pooled one, which may have been closed the same way).
            connection = await self._connect()
            await self._head_of_answer(connection, request)
        return connection

    async def _head_of_answer(self, connection: _Connection, request: bytes) -> None:
        try:
            connection.start(request)
            while not connection.headers_done:
                await connection.wait(self.read_timeout)
        except BaseException:
            connection.close()
            raise

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < _IDLE_S and connection.quiet():
                connection.reused = True
                return connection
            connection.close()
        return await self._connect()

    async def _connect(self) -> _Connection:
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
        self._slots.release()

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
