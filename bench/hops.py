"""Bare forwarding hops, one per HTTP client, for choosing the gateway's upstream client (`bench_http.py HOP`).

Each is the same plain-ASGI pass-through (read the body, forward the headers
but Host, stream the answer back) with a different client underneath; none
makes any security decision. `lean` is the gateway's own `UpstreamProxy`.

    UPSTREAM=http://127.0.0.1:PORT/mcp python bench/hops.py CLIENT PORT     (aiohttp | httpx | httpx2 | lean)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:9000/mcp")
_SKIP = {b"host", b"content-length", b"connection"}


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def aiohttp_hop() -> Any:
    import aiohttp

    session: list[aiohttp.ClientSession] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not session:
            session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False))
        body = await _body(receive)
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k not in _SKIP]
        async with session[0].request(scope["method"], UPSTREAM, data=body, headers=headers) as response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(k.lower(), v) for k, v in response.raw_headers]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def httpx_hop(module: str) -> Any:
    httpx: Any = __import__(module)
    client: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not client:
            client.append(httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)))
        body = await _body(receive)
        headers = [(k, v) for k, v in scope["headers"] if k not in _SKIP]
        request = client[0].build_request(scope["method"], UPSTREAM, content=body, headers=headers)
        response = await client[0].send(request, stream=True)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": list(response.headers.raw)})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


def lean_hop() -> Any:
    from gateway.config import Limits, Upstream
    from gateway.proxy import UpstreamProxy

    return UpstreamProxy(Upstream(name="bench", path="/mcp", url=UPSTREAM), Limits(), "http://127.0.0.1:1")


def main() -> None:
    client, port = sys.argv[1], int(sys.argv[2])
    app = {"aiohttp": aiohttp_hop, "httpx": lambda: httpx_hop("httpx"), "httpx2": lambda: httpx_hop("httpx2"),
           "lean": lean_hop}[client]()
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
