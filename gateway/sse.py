"""Incremental Server-Sent Events decoding and encoding, one event at a time.

Owns the SSE wire format (WHATWG HTML "event stream interpretation"): lines
ending in CRLF, LF or CR; `data:` lines joined with LF; `id:`, `event:`,
`retry:`; comments (`:`) kept so a pass-through can reproduce them; an empty
line dispatches. Priming events with an empty `data:` (2025-11-25) are events
like any other. Memory is bounded by `max_event_bytes`: a stream whose single
event grows past it raises `EventTooLarge` instead of being buffered whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.exceptions import GatewayError


class EventTooLarge(GatewayError, ValueError):
    """One event grew past the decoder's bound. `events` are those completed before it, in the same chunk."""

    def __init__(self, message: str, events: list[Event]) -> None:
        super().__init__(message)
        self.events = events


@dataclass(slots=True)
class Event:
    """One dispatched SSE event. `raw` is its exact bytes including the blank line that ended it."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    raw: bytes = b""

    @property
    def is_message(self) -> bool:
        """True for events that carry a JSON-RPC message (type `message` or no type, with data)."""
        return self.data is not None and self.data != "" and self.event in (None, "message")


_LINE_END = re.compile(rb"[\r\n]")


class Decoder:
    """Feed bytes as they arrive; get back every event completed so far."""

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._buffer = b""  # bytes of the event being read, not yet dispatched
        self._scanned = 0  # how far into _buffer complete lines have been examined
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events: list[Event] = []
        buffer = self._buffer
        line_start = self._scanned
        event_start = 0
        index = line_start
        while (found := _LINE_END.search(buffer, index)) is not None:
            index = found.start()
            byte = buffer[index]
            if byte == 0x0D and index + 1 == len(buffer):
                break  # a CR at the end may be the first half of a CRLF still in flight
            line_end = index
            index += 2 if byte == 0x0D and buffer[index + 1] == 0x0A else 1
            if line_end == line_start:  # blank line: dispatch
                if line_start > event_start:
                    events.append(_parse(buffer[event_start:index]))
                event_start = index
            line_start = index
        self._buffer = buffer[event_start:]
        self._scanned = line_start - event_start
        if len(self._buffer) > self._max:
            raise EventTooLarge(f"an SSE event exceeded {self._max} bytes", events)
        return events

    def pending(self) -> bytes:
        """Bytes of an event not yet terminated (at end of stream it is never dispatched, per spec)."""
        return self._buffer


def _parse(raw: bytes) -> Event:
    event = Event(raw=raw)
    data_lines: list[str] = []
    text = raw.decode("utf-8", errors="replace")
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            continue
        if line.startswith(":"):
            event.comments.append(line[1:])
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            event.event = value
        elif name == "id":
            if "\0" not in value:
                event.id = value
        elif name == "retry" and value.isdigit():
            event.retry = int(value)
    if data_lines:
        event.data = "\n".join(data_lines)
    return event


def encode(data: str | None, *, event: str | None = None, id: str | None = None, retry: int | None = None,
           comments: list[str] | tuple[str, ...] = ()) -> bytes:
    """One SSE event carrying `data` (split on newlines into several `data:` lines; None: no data line)."""
    lines = [f":{comment}" for comment in comments]
    if event is not None:
        lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {id}")
    if retry is not None:
        lines.append(f"retry: {retry}")
    if data is not None:
        lines.extend(f"data: {line}" if line else "data:" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def encode_event(event: Event, data: str | None = None) -> bytes:
    """`event` written anew from what was decoded of it (its data replaced by `data` when given): the bytes a
    client reads are the ones the gateway read, whatever line ends or field repeats the upstream used."""
    return encode(event.data if data is None else data, event=event.event, id=event.id, retry=event.retry,
                  comments=event.comments)
