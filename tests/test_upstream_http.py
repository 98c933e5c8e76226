"""The upstream hop's HTTP/1.1 client against scripted servers on real loopback sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from gateway import upstream_http
from gateway.upstream_http import UpstreamError, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server running `handler` per connection; yields its URL and the list of connection numbers."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections) + 1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/mcp", connections
    finally:
        listener.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
        b"content-length:")), 0)
    return head + await reader.readexactly(length)


async def collect(pool: UpstreamPool, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await pool.request("POST", "/mcp", [(b"content-type", b"application/json")], body)
    try:
        return response.status, b"".join([chunk async for chunk, _ in response.body()])
    finally:
        response.release()


async def test_keep_alive_connections_are_reused_and_requests_arrive_whole() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    async with server(handler) as (url, connections):
        pool = UpstreamPool(url, connect_timeout=2, read_timeout=2)
        assert [await collect(pool, b'{"n":%d}' % i) for i in range(3)] == [(200, b"ok")] * 3
        pool.close()
    assert connections == [1]  # one connection for all three
    assert seen[2].startswith(b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1:") and seen[2].endswith(b'\r\n\r\n{"n":2}')


async def test_chunked_and_connection_delimited_bodies_are_read_to_their_end() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    for handler, expected in ((chunked, b"abcde"), (until_close, b"all of it")):
        async with server(handler) as (url, _):
            pool = UpstreamPool(url, connect_timeout=2, read_timeout=2)
            assert await collect(pool) == (200, expected)
            pool.close()


async def test_failures_have_a_kind() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    for handler, kind in ((hang_up, "disconnected"), (cut, "reset"), (silent, "timeout"), (garbage, "protocol")):
        async with server(handler) as (url, _):
            pool = UpstreamPool(url, connect_timeout=2, read_timeout=0.3)
            with pytest.raises((UpstreamError, TimeoutError)) as failed:
                await collect(pool)
            assert (failed.value.kind if isinstance(failed.value, UpstreamError) else "timeout") == kind
            pool.close()
    async with server(hang_up) as (url, _):
        pass  # closed: nothing listens on its port any more
    with pytest.raises(UpstreamError) as refused:
        await collect(UpstreamPool(url, connect_timeout=2, read_timeout=2))
    assert refused.value.kind == "connect"


async def test_a_slow_reader_pauses_the_upstream_instead_of_buffering_the_answer() -> None:
    size = 8 * 1024 * 1024

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    async with server(big) as (url, _):
        pool = UpstreamPool(url, connect_timeout=2, read_timeout=5)
        response = await pool.request("GET", "/mcp", [], b"")
        received, most = 0, 0
        async for chunk, _ in response.body():
            received += len(chunk)
            most = max(most, len(chunk))
            await asyncio.sleep(0.001)  # a client slower than loopback
        response.release()
        pool.close()
    assert received == size
    assert most <= upstream_http._HIGH_WATER + 256 * 1024  # never much more than the high-water mark at once


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused() -> None:
    async def one_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # keep-alive by default, then it leaves
        await writer.drain()

    async with server(one_and_close) as (url, connections):
        pool = UpstreamPool(url, connect_timeout=2, read_timeout=2)
        assert await collect(pool) == (200, b"ok")
        await asyncio.sleep(0.05)  # the close arrives while the connection idles in the pool
        assert await collect(pool) == (200, b"ok")
        pool.close()
    assert connections == [1, 2]


async def test_a_connection_that_speaks_while_idle_is_dropped() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged")  # unasked: an answer to nothing
            await writer.drain()

    async with server(chatty) as (url, connections):
        pool = UpstreamPool(url, connect_timeout=2, read_timeout=2)
        assert await collect(pool) == (200, b"ok")
        await asyncio.sleep(0.1)
        assert await collect(pool) == (200, b"ok")  # not the forged answer queued on the first connection
        pool.close()
    assert connections == [1, 2]


async def test_a_close_the_loop_has_not_seen_yet_still_keeps_the_connection_out_of_use() -> None:
    from tests.test_upstream_failures import ScriptedUpstream

    # Answers without "connection: close", then closes at once (a server ending an idle keep-alive).
    upstream = ScriptedUpstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    try:
        pool = UpstreamPool(f"http://127.0.0.1:{upstream.port}/mcp", connect_timeout=2, read_timeout=2)
        assert await collect(pool) == (200, b"ok")
        time.sleep(0.1)  # the close reaches the socket, but the event loop does not run to notice it
        assert await collect(pool) == (200, b"ok")
        pool.close()
    finally:
        upstream.close()
    assert len(upstream.received) == 2


async def test_a_request_lost_to_an_idle_close_goes_out_again_on_a_fresh_connection() -> None:
    # The first connection answers once, then closes as the next request arrives without answering it: what a
    # server ending an idle keep-alive connection does to a request in flight. That request was never read.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
        await writer.drain()
        if len(connections) == 1:
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()

    async with server(handler) as (url, connections):
        pool = UpstreamPool(url, connect_timeout=2, read_timeout=2)
        assert await collect(pool) == (200, b"first")
        assert await collect(pool) == (200, b"first")  # written once more, on connection 2
        pool.close()
    assert connections == [1, 2]


async def test_a_request_that_failed_on_a_fresh_connection_is_not_sent_again() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()

    async with server(handler) as (url, connections):
        pool = UpstreamPool(url, connect_timeout=2, read_timeout=2)
        with pytest.raises(UpstreamError) as failed:
            await collect(pool)
        pool.close()
    assert failed.value.kind == "disconnected" and connections == [1]


async def test_interim_answers_are_skipped_and_the_connection_serves_the_next_request_right() -> None:
    # What uvicorn does for a request carrying Expect: 100-continue: 100 first, then the answer.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for n in range(2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nanswer%d" % n)
            await writer.drain()

    async with server(handler) as (url, connections):
        pool = UpstreamPool(url, connect_timeout=2, read_timeout=2)
        assert [await collect(pool) for _ in range(2)] == [(200, b"answer0"), (200, b"answer1")]
        pool.close()
    assert connections == [1]


async def test_an_upstream_url_with_credentials_is_refused() -> None:
    with pytest.raises(ValueError, match="credentials"):
        UpstreamPool("http://user:pass@127.0.0.1:1/mcp", connect_timeout=1, read_timeout=1)


async def test_the_client_speaks_http_1_1_as_h11_the_strict_peer_reads_and_writes_it() -> None:
    """An h11 server: every request the client writes must parse under h11's rules, and every answer h11 frames
    (a length, chunked, after a 100 Continue, with no body) must come back as h11 sent it, on one connection."""
    import h11

    answers = [  # (interim, status, headers, body chunks)
        (False, 200, [("Content-Length", "5")], [b"hello"]),
        (False, 200, [("Transfer-Encoding", "chunked")], [b"ab", b"cde", b"f"]),
        (True, 200, [("Content-Length", "2")], [b"ok"]),
        (False, 204, [], []),
        (False, 404, [("Content-Length", "9"), ("X-Many", "a"), ("X-Many", "b")], [b"not found"]),
    ]
    seen: list[tuple[str, bytes, list[tuple[bytes, bytes]], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = h11.Connection(h11.SERVER)
        for interim, status, headers, chunks in answers:
            body = b""
            request = None
            while True:
                event = peer.next_event()
                if event is h11.NEED_DATA:
                    peer.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise AssertionError(f"unexpected {event!r}")
            assert request is not None
            seen.append((request.method.decode(), request.target, list(request.headers), body))
            if interim:
                writer.write(peer.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            writer.write(peer.send(h11.Response(status_code=status, headers=headers)) or b"")
            for chunk in chunks:
                writer.write(peer.send(h11.Data(data=chunk)) or b"")
            writer.write(peer.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            peer.start_next_cycle()

    async with server(handler) as (url, connections):
        pool = UpstreamPool(url, connect_timeout=2, read_timeout=2)
        got = []
        for index in range(len(answers)):
            method = "GET" if index == 3 else "POST"
            response = await pool.request(method, "/mcp?x=1", [(b"content-type", b"application/json"),
                                                               (b"x-index", str(index).encode())],
                                          b'{"n":%d}' % index if method == "POST" else b"")
            body = b"".join([chunk async for chunk, _ in response.body()])
            got.append((response.status, body, [(n.lower(), v) for n, v in response.headers
                                                if n.lower() == b"x-many"]))
            response.release()
        pool.close()
    assert connections == [1]  # every answer framed so that the connection stayed usable
    assert [(status, body) for status, body, _ in got] == [(a[1], b"".join(a[3])) for a in answers]
    assert got[4][2] == [(b"x-many", b"a"), (b"x-many", b"b")]
    assert [(method, target) for method, target, _, _ in seen] == [("POST", b"/mcp?x=1")] * 3 + \
        [("GET", b"/mcp?x=1"), ("POST", b"/mcp?x=1")]
    assert seen[0][3] == b'{"n":0}' and dict(seen[0][2])[b"host"].startswith(b"127.0.0.1:")
