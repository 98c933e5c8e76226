"""The client-facing HTTP/1.1 server protocol `serve` runs: uvicorn's httptools protocol with a head deadline.

Owns one rule uvicorn lacks: a request head must arrive whole within
`limits.client_header_timeout_s` of its first byte (or of the connection
opening). uvicorn waits for a head for ever, and its keep-alive timer restarts
with every byte, so a client trickling a header a byte at a time (slowloris)
would hold its connection, and its file descriptor, as long as it liked. No
worker is held meanwhile (the event loop serves everyone else), but the
descriptors run out. The body has its own deadline where a client's body is
read (`exchange.read_body`: `limits.client_body_timeout_s`, answered 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadDeadlineProtocol(HttpToolsProtocol):
    """Give it to uvicorn as `http=`. `head_timeout_s` is process-wide: `serve` sets it from the config once,
    in each worker, before serving (uvicorn makes the protocol objects itself and passes them no settings of
    ours)."""

    head_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm()  # a pipelined head behind an answer still going out: judged once that answer is done
        else:
            self.transport.close()
