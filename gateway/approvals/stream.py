"""A held client: keeping it informed (progress notifications on an SSE answer the gateway starts itself), and
noticing when it leaves.

Owns `HeldAnswer`, the `send` a held legacy-era request is answered through
when its client sent a progress token and accepts `text/event-stream`. Until
the first progress notification it is transparent. Once it has started the
SSE answer (HTTP 200), whatever comes after (the upstream's inspected answer,
or the gateway's refusal) is carried in that stream: an SSE answer event by
event, a JSON answer as one `message` event. Nothing is carried uninspected:
it sits after the response inspector, never before it.

Also owns `Departure`: whether the client of a held request has left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.types import ASGIMessage, ASGIReceive, ASGISend

if TYPE_CHECKING:
    from gateway.exchange import Exchange


def progress_token(ex: Exchange) -> str | int | None:
    """The progress token of a single legacy-era request whose client takes an SSE answer, if it sent one."""
    if ex.era != "legacy" or len(ex.messages) != 1:
        return None
    accept = b",".join(v for n, v in ex.scope["headers"] if n == b"accept").lower()
    if b"text/event-stream" not in accept:
        return None
    params = ex.messages[0].raw.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if isinstance(token, str | int) and not isinstance(token, bool) else None


def _event(data: bytes) -> bytes:
    return b"event: message\n" + b"".join(b"data: " + line + b"\n" for line in data.splitlines()) + b"\n"


class HeldAnswer:
    """A `send` that may have started its own SSE answer to carry progress notifications."""

    def __init__(self, send: ASGISend, token: str | int) -> None:
        self._send = send
        self._token = token
        self._count = 0
        self._started = False
        self._transparent = False
        self._upstream_sse = False
        self._buffer: list[bytes] = []

    async def progress(self, message: str) -> None:
        if self._transparent:
            return
        if not self._started:
            self._started = True
            await self._send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]})
        self._count += 1
        note: dict[str, Any] = {"jsonrpc": "2.0", "method": "notifications/progress",
                                "params": {"progressToken": self._token, "progress": self._count, "message": message}}
        await self._send({"type": "http.response.body", "body": _event(orjson.dumps(note)), "more_body": True})

    async def __call__(self, message: ASGIMessage) -> None:
        if not self._started:
            self._transparent = True
        if self._transparent:
            await self._send(message)
            return
        if message["type"] == "http.response.start":
            content_type = next((v for n, v in message.get("headers", ()) if n.lower() == b"content-type"), b"")
            self._upstream_sse = content_type.lower().startswith(b"text/event-stream")
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        body, more = message.get("body", b""), message.get("more_body", False)
        if self._upstream_sse:
            await self._send({"type": "http.response.body", "body": body, "more_body": more})
            return
        self._buffer.append(body)
        if not more:
            data = b"".join(self._buffer).strip()
            await self._send({"type": "http.response.body", "body": _event(data) if data else b"",
                              "more_body": False})


class Departure:
    """Whether the client of a held request has left (its connection's `http.disconnect`), watched only while
    a call is held, and never past the gate: the forwarding hop reads `receive` after it."""

    def __init__(self, receive: ASGIReceive) -> None:
        self._receive = receive
        self._watch: asyncio.Task[None] | None = None

    async def _disconnect(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a connection that cannot say more is gone too
            return

    async def before(self, waiting: Awaitable[object]) -> bool:
        """Await `waiting` unless the client leaves first; True if it left."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._disconnect())
        wait = asyncio.ensure_future(waiting)
        done, _ = await asyncio.wait({wait, self._watch}, return_when=asyncio.FIRST_COMPLETED)
        if wait not in done:
            wait.cancel()
            return True
        return False

    def stop_watching(self) -> None:
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
