"""The upstreams the HTTP benchmarks run, each in its own process on a loopback port.

Both sides of every comparison use the same server stack, pinned: uvicorn with
uvloop and httptools, one process, no access log.

    python bench/servers.py mcp PORT [--sse]   the SDK's MCPServer, stateless; JSON answers (or SSE with --sse):
                                               echo(text), progress(count) streaming `count` progress
                                               notifications, and bench://big, a 100 MB text resource
    python bench/servers.py trivial PORT       a bare ASGI app answering every POST with one canned result
    python bench/servers.py otlp PORT          an OTLP/HTTP receiver that takes every export and keeps nothing
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

BIG_BYTES = 100 * 1024 * 1024
CANNED = (b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}],"isError":false}}')


def mcp_app(sse: bool) -> Any:
    server = MCPServer("bench")
    big = "x" * BIG_BYTES

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    async def progress(count: int, ctx: Context) -> str:
        """Send `count` progress notifications, then answer."""
        for step in range(count):
            await ctx.report_progress(step + 1, count)
        return f"{count} steps"

    @server.resource("bench://big")
    def big_resource() -> str:
        """100 MB of text."""
        return big

    return server.streamable_http_app(stateless_http=True, json_response=not sse)


async def trivial_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(CANNED)).encode())]})
    await send({"type": "http.response.body", "body": CANNED})


async def otlp_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts an export (POST /v1/traces) with an empty ExportTraceServiceResponse: zero protobuf bytes."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/x-protobuf"), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["mcp", "trivial", "otlp"])
    parser.add_argument("port", type=int)
    parser.add_argument("--sse", action="store_true")
    args = parser.parse_args()
    app = mcp_app(args.sse) if args.kind == "mcp" else otlp_app if args.kind == "otlp" else trivial_app
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, lifespan="on" if args.kind == "mcp" else "off")


if __name__ == "__main__":
    main()
